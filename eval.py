"""python eval.py [overrides]: see conf/eval.yaml."""

from retrain.utils.hydra import launch

if __name__ == "__main__":
    launch(__file__, "eval", "retrain.tasks.eval:evaluate")

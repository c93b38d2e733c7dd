"""python serve.py ckpt_path=SOURCE [overrides]: see conf/serve.yaml."""

from retrain.utils.hydra import launch

if __name__ == "__main__":
    launch(__file__, "serve", "retrain.tasks.serve:serve")

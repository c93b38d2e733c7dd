"""python export.py [overrides]: see conf/export.yaml."""

from retrain.utils.hydra import launch

if __name__ == "__main__":
    launch(__file__, "export", "retrain.tasks.export:export")

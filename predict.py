"""python predict.py [overrides]: see conf/predict.yaml."""

from retrain.utils.hydra import launch

if __name__ == "__main__":
    launch(__file__, "predict", "retrain.tasks.predict:predict")

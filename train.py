"""python train.py [overrides]: see conf/train.yaml."""

from retrain.utils.hydra import launch

if __name__ == "__main__":
    launch(__file__, "train", "retrain.tasks.train:train")

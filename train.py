"""python train.py [overrides]: see conf/train.yaml."""

import hydra
from omegaconf import DictConfig

from retrain.tasks.train import train
from retrain.utils.hydra import register_resolvers, run_task

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Entry point; errors in user input print one paragraph instead of a traceback."""
    return run_task(train, cfg)


if __name__ == "__main__":
    main()

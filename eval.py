"""python eval.py [overrides]: see conf/eval.yaml."""

import hydra
from omegaconf import DictConfig

from retrain.tasks.eval import evaluate
from retrain.utils.hydra import register_resolvers, run_task

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    """Entry point; errors in user input print one paragraph instead of a traceback."""
    return run_task(evaluate, cfg)


if __name__ == "__main__":
    main()

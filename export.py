"""python export.py [overrides]: see conf/export.yaml."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from retrain.utils.cli import with_config_hints
from retrain.utils.hydra import register_resolvers, run_task

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> float | None:
    """Entry point; errors in user input print one paragraph instead of a traceback."""
    # Imported here, after Hydra has composed the config: a typo is reported before Lightning loads (~7 s).
    from retrain.tasks.export import export

    return run_task(export, cfg)


if __name__ == "__main__":
    with_config_hints(main, config_dir=Path(__file__).resolve().parent / "conf", config_name="export")

"""What the experiment trackers receive beyond metrics: the config, the artifact's identity and the report."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger
from PIL import Image

# The metadata that identifies a model; logged as hyperparameters under `artifact/` so runs can be filtered by it.
ARTIFACT_KEYS = ("name", "version", "arch", "num_classes", "class_names", "augment", "freeze", "train_bn", "git_commit")


def run_facts(metadata: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters of a run: the resolved config plus the artifact's identity, lineage and data."""
    dataset = metadata.get("dataset") or {}
    artifact = {key: metadata.get(key) for key in ARTIFACT_KEYS}
    # Lists read better (and are not dropped by MLflow) as one comma-separated value.
    artifact["class_names"] = ",".join(metadata.get("class_names") or [])
    artifact["freeze"] = ",".join(metadata.get("freeze") or []) or "none"
    artifact["parent"] = (metadata.get("parent") or {}).get("source")
    artifact["dataset"] = {key: dataset.get(key) for key in ("root", "fingerprint", "split_sizes", "bad_files")}
    artifact["software"] = metadata.get("software")
    return {**metadata.get("config", {}), "artifact": artifact}


def log_run_facts(loggers: Iterable[Logger], metadata: dict[str, Any]) -> None:
    """Log the run's hyperparameters to every logger, and the full metadata as metadata.json to MLflow."""
    facts = run_facts(metadata)
    for logger in loggers:
        logger.log_hyperparams(facts)
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_dict(logger.run_id, metadata, "metadata.json")


def log_report(loggers: Iterable[Logger], report_dir: Path, names: Iterable[str]) -> None:
    """Attach report files: as artifacts under `report/` in MLflow, as images in TensorBoard."""
    paths = [Path(report_dir) / name for name in names if (Path(report_dir) / name).is_file()]
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            for path in paths:
                logger.experiment.log_artifact(logger.run_id, str(path), "report")
        elif isinstance(logger, TensorBoardLogger):
            for path in (p for p in paths if p.suffix == ".png"):
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                logger.experiment.add_image(f"report/{path.stem}", pixels, dataformats="HWC")
            logger.experiment.flush()

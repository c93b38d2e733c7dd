"""The LR finder: Lightning's range test before fit; its suggestion replaces model.lr unless the user set model.lr."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib.pyplot as plt
from lightning.pytorch.tuner import Tuner
from matplotlib.figure import Figure
from omegaconf import DictConfig

from retrain.errors import ConfigError
from retrain.model.module import ClassifierModule
from retrain.utils.cli import set_on_command_line
from retrain.utils.io import write_json
from retrain.utils.ranks import is_rank_zero

log = logging.getLogger("retrain")

PLOT = "lr_find.png"
RECORD = "lr_find.json"


def lr_set_by_user(overrides: Iterable[str]) -> bool:
    """Whether this run's command line fixed `model.lr` (then the finder only advises): `model.lr=`, `+`, `++`."""
    return set_on_command_line(overrides, "model.lr")


def find_lr(
    module: ClassifierModule,
    datamodule: L.LightningDataModule,
    *,
    tune: DictConfig,
    trainer_cfg: DictConfig,
    run_dir: Path,
    user_lr: bool,
    resuming: bool,
) -> dict[str, Any]:
    """Run the range test in one process, save its plot, and use its suggestion as `module.lr` unless `user_lr`.

    Rank 0 runs it before DDP starts the other ranks; they read its record from the run directory, so every rank
    trains with the same LR. Returns the record that results.json keeps.
    """
    if resuming:
        raise ConfigError(
            "tune.lr_find=true with ckpt_path: a resumed run continues its optimizer and LR schedule, so a found LR "
            "would not be used. Fix: drop tune.lr_find, or start a new run (no ckpt_path)."
        )
    record_path = run_dir / RECORD
    if not is_rank_zero():
        record = json.loads(record_path.read_text())
    else:
        record = _run_finder(module, datamodule, tune=tune, trainer_cfg=trainer_cfg, run_dir=run_dir, user_lr=user_lr)
        write_json(record_path, record)
    module.lr = record["lr"]
    return record


def _run_finder(
    module: ClassifierModule,
    datamodule: L.LightningDataModule,
    *,
    tune: DictConfig,
    trainer_cfg: DictConfig,
    run_dir: Path,
    user_lr: bool,
) -> dict[str, Any]:
    trainer = L.Trainer(
        accelerator=trainer_cfg.get("accelerator", "auto"),
        devices=1,
        precision=trainer_cfg.get("precision", "32-true"),
        deterministic=trainer_cfg.get("deterministic", False),
        fast_dev_run=trainer_cfg.get("fast_dev_run", False),
        default_root_dir=run_dir,  # Lightning's temporary checkpoint goes here, then is removed
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    finder = Tuner(trainer).lr_find(
        module,
        datamodule=datamodule,
        min_lr=float(tune.min_lr),
        max_lr=float(tune.max_lr),
        num_training=int(tune.num_training),
        update_attr=False,
    )
    record: dict[str, Any] = {
        "suggestion": None,
        "applied": False,
        "lr": module.lr,
        "plot": None,
        "range": [float(tune.min_lr), float(tune.max_lr)],
        "steps": int(tune.num_training),
    }
    if finder is None:
        record["reason"] = "skipped: trainer.fast_dev_run is set"
        return record
    fig = finder.plot(suggest=True)
    if isinstance(fig, Figure):
        fig.savefig(run_dir / PLOT, dpi=100)
        plt.close(fig)
        record["plot"] = str(run_dir / PLOT)
    suggestion = finder.suggestion()
    record["suggestion"] = suggestion
    if suggestion is None:
        record["reason"] = "no suggestion: the loss curve had too few points; raise tune.num_training"
    elif user_lr:
        record["reason"] = f"model.lr={module.lr} was set on the command line, so it is kept"
    else:
        record.update(applied=True, lr=float(suggestion), reason="the finder's suggestion (steepest loss descent)")
    log.info("LR finder: suggestion %s; training with lr=%s (%s)", suggestion, record["lr"], record["reason"])
    return record

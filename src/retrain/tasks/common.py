"""Pieces that train, eval and predict share: the data from config, the loggers, the single-device evaluator."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from retrain.artifacts.formats import Artifact
from retrain.data.datamodule import ImageFolderDataModule
from retrain.data.demo import build_demo_dataset
from retrain.data.folds import as_recorded, fold_split
from retrain.data.images import IMAGE_PROBLEM_KINDS
from retrain.data.splits import DataSplits, split_as_recorded
from retrain.data.summary import log_data_summary
from retrain.data.validate import ERROR_KINDS, ValidationReport, raise_for_bad_files, scan
from retrain.errors import ConfigError, DataError
from retrain.utils.cli import set_on_command_line
from retrain.utils.ranks import is_rank_zero

log = logging.getLogger("retrain")

DATAMODULE_KEYS = (
    "batch_size",
    "eval_batch_size",
    "num_workers",
    "pin_memory",
    "persistent_workers",
    "prefetch_factor",
    "fast_decode",
    "decode_cache",
    "mixup_alpha",
    "cutmix_alpha",
    "sampler",
    "hflip",
)


def inherit_hflip(data_cfg: DictConfig, parent: Artifact | None, overrides: Iterable[str]) -> None:
    """Keep `data.hflip=false` from the model a run retrains or resumes: its images must not be mirrored (text,
    digits, road signs), so a retrain that forgot the setting would train on mirrored images and drop the mark
    that makes eval and predict refuse `tta=flip`. A `data.hflip=...` on the command line still decides."""
    pre = ((parent.metadata if parent else None) or {}).get("preprocessing") or {}
    if pre.get("hflip", True) or not data_cfg.hflip:
        return
    origin = parent.path if parent and parent.path else "the model it starts from"
    if set_on_command_line(overrides, "data.hflip"):
        log.warning("data.hflip=true: the images are mirrored, although %s was trained with data.hflip=false", origin)
        return
    data_cfg.hflip = False
    log.info("data.hflip=false, as %s was trained (its images are never mirrored); data.hflip=true overrides", origin)


def find_splits(data_cfg: DictConfig, recorded: dict[str, Any] | None = None) -> DataSplits:
    """Discover data.root; reuse the split recorded in an artifact when it is from the same folder layout."""
    if data_cfg.root is None:
        raise ConfigError(
            "data.root is not set. Expected the folder of your images: DIR/<class>/* or DIR/train/<class>/*. "
            "Fix: python train.py data.root=/path/to/images (or `make train` for the built-in demo data)."
        )
    return split_as_recorded(data_cfg.root, recorded, **split_options(data_cfg))


def split_options(data_cfg: DictConfig) -> dict[str, Any]:
    """How to split a flat folder when no split was recorded: data.val_fraction, test_fraction and split_seed."""
    return {"val_fraction": data_cfg.val_fraction, "test_fraction": data_cfg.test_fraction, "seed": data_cfg.split_seed}


def prepare_splits(data_cfg: DictConfig, recorded: dict[str, Any] | None = None) -> tuple[DataSplits, list[str]]:
    """The splits to train on and the bad files left out: build the demo, scan the folder, apply on_bad_file."""
    if data_cfg.demo and is_rank_zero():
        build_demo_dataset(Path(data_cfg.root))
    splits = find_splits(data_cfg, recorded)
    bad: list[str] = []
    report: ValidationReport | None = None
    if data_cfg.validate != "off":
        report = scan(Path(data_cfg.root), mode=data_cfg.validate)
        _raise_for_structure(report)
        bad = [str(p) for p in report.bad_files()]
        if bad and data_cfg.on_bad_file == "error":
            raise_for_bad_files(report)
        if bad:
            log.warning("skipping %d bad files (data.on_bad_file=skip); listed in bad_files.txt", len(bad))
            splits = splits.without({os.path.abspath(p) for p in bad})
    if report is not None:  # identical files in train/ and val/ share a fold, as in a flat folder (data/folds.py)
        splits.duplicates += [[str(splits.root / p.relative_to(report.root)) for p in i] for i in report.identical]
    if data_cfg.get("group_by") and splits.layout == "folder" and not (recorded or {}).get("cv") and is_rank_zero():
        _warn_where_groups_are_not_kept(data_cfg, splits)
    if recorded and recorded.get("cv"):  # a resumed fold run: the folds it was trained with (data/folds.py)
        _check_resumed_fold(data_cfg, recorded["cv"])
        splits = as_recorded(splits, recorded)
    elif data_cfg.get("fold") is not None:  # k-fold CV: this fold's part of the pool validates
        splits = fold_split(splits, data_cfg.fold, data_cfg.folds, data_cfg.split_seed, data_cfg.group_by)
    if is_rank_zero():
        log_data_summary(splits, report)  # the weights line follows it: summary.log_weights_origin
    return splits, bad


def _check_resumed_fold(data_cfg: DictConfig, cv: dict[str, Any]) -> None:
    """Refuse a `data.fold` other than the one the resumed run trained: it went on with the recorded fold, silently."""
    asked = data_cfg.get("fold")
    if asked is not None and str(asked) != str(cv.get("fold")):
        raise ConfigError(
            f"data.fold={asked}, but the run being resumed trained fold {cv.get('fold')} of {cv.get('folds')}, and "
            f"a resumed run goes on with the fold it started. Fix: data.fold={cv.get('fold')} (or leave it out) to "
            f"resume it, or train fold {asked} from the start, without ckpt_path."
        )


def _warn_where_groups_are_not_kept(data_cfg: DictConfig, splits: DataSplits) -> None:
    """data.group_by keeps groups whole across k-fold folds only: a flat folder's val and test images are drawn one
    by one, so a group (a patient) can have images on both sides and score as if unseen."""
    if data_cfg.get("fold") is None:
        log.warning(
            "data.group_by=%r groups images for k-fold CV only (experiment=cv); this run draws its val and test "
            "images from %s one by one, so a group can have images in train and in val or test, which then score "
            "too high. Fix: put each group's images in one of DIR/train/<class>/, DIR/val/<class>/ and "
            "DIR/test/<class>/, or run k-fold CV: python train.py -m experiment=cv data.group_by=...",
            data_cfg.group_by,
            splits.root,
        )
    elif splits.samples.get("test"):
        log.warning(
            "data.group_by=%r keeps groups whole across the folds, but the test split of %s is drawn one image at a "
            "time: a group can have images in test and in the folds, so the refit's test score comes out too "
            "high. Fix: put the test groups in DIR/test/<class>/ and the rest in DIR/train/<class>/, or "
            "data.test_fraction=0.",
            data_cfg.group_by,
            splits.root,
        )


def _raise_for_structure(report: ValidationReport) -> None:
    """Stop on a missing or empty class or split under either policy: skipping files cannot fix those."""
    problems = [p for p in report.problems if p.kind in ERROR_KINDS and p.kind not in IMAGE_PROBLEM_KINDS]
    if problems:
        listed = "; ".join(f"{p.path}: {p.detail}" for p in problems[:10])
        raise DataError(
            f"{report.root} has {len(problems)} class or split problems that data.on_bad_file cannot skip: "
            f"{listed}. Expected the same non-empty class folders in every split. Fix: add images to the empty "
            f"classes or remove them from every split; `retrain validate {report.root}` lists all."
        )


def make_datamodule(
    splits: DataSplits,
    data_cfg: DictConfig,
    *,
    image_size: int | None = None,
    augment: str | None = None,
    seed: int = 0,
) -> ImageFolderDataModule:
    """The DataModule for `splits`; image size and augmentation may come from an artifact instead of the config."""
    options = {key: data_cfg.get(key) for key in DATAMODULE_KEYS}
    return ImageFolderDataModule(
        splits,
        image_size=image_size or data_cfg.image_size,
        augment=augment or data_cfg.augment,
        seed=seed,
        **options,
    )


def make_loggers(cfg: DictConfig) -> list[Logger]:
    """Instantiate every logger under `logger:` (none when the group is null)."""
    loggers_cfg = cfg.get("logger") or {}
    return [instantiate(conf) for conf in loggers_cfg.values() if conf is not None and "_target_" in conf]


def make_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Instantiate every callback under `callbacks:`."""
    callbacks_cfg = cfg.get("callbacks") or {}
    return [instantiate(conf) for conf in callbacks_cfg.values() if conf is not None and "_target_" in conf]


def single_device_trainer(trainer_cfg: DictConfig, loggers: list[Logger] | bool = False) -> L.Trainer:
    """A one-process Trainer for test/predict, so every sample is scored exactly once (no DDP padding)."""
    return L.Trainer(
        accelerator=trainer_cfg.get("accelerator", "auto"),
        devices=1,
        num_nodes=1,
        precision=trainer_cfg.get("precision", "32-true"),
        logger=loggers,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=trainer_cfg.get("enable_progress_bar", True),
        default_root_dir=trainer_cfg.get("default_root_dir"),
        limit_test_batches=1 if trainer_cfg.get("fast_dev_run") else trainer_cfg.get("limit_test_batches"),
        limit_predict_batches=trainer_cfg.get("limit_predict_batches"),
    )


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able data, for metadata and loggers."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}

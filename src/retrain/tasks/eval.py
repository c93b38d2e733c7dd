"""Eval: score any saved artifact on a folder, with the classes and transforms recorded in the artifact."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from retrain.analysis.tta_gain import compare_tta
from retrain.artifacts.metadata import Preprocessing
from retrain.data.splits import DataSplits
from retrain.errors import DataError
from retrain.inference.tta import check_tta
from retrain.model.loading import load_trained, trained_splits
from retrain.model.module import ClassifierModule
from retrain.tasks.common import make_datamodule, make_loggers, single_device_trainer, split_options
from retrain.tasks.guards import check_batch_sizes
from retrain.utils import console
from retrain.utils.hydra import output_dir
from retrain.utils.io import write_json

log = logging.getLogger("retrain")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test an artifact on data.root's test split (val when there is none) and write results.json."""
    console.filter_known_warnings()
    console.send_library_logs_to_run_log()  # one copy of each Lightning line, in the terminal and eval.log
    check_batch_sizes(cfg.data)
    source = str(cfg.ckpt_path)
    net, meta = load_trained(source, model_dir=Path(cfg.paths.model_dir), allow_pickle=cfg.allow_pickle)
    tta = check_tta(cfg.get("tta"), meta.preprocessing, source=source)
    splits = trained_splits(meta, cfg.data.root, source=source, **split_options(cfg.data))
    split = scored_split(splits, cfg.split, source)
    splits.samples["test"] = splits.samples[split]
    datamodule = make_datamodule(splits, cfg.data, image_size=meta.preprocessing.image_size, augment="none")
    module = ClassifierModule(net, meta.class_names)
    tester = single_device_trainer(cfg.trainer, make_loggers(cfg))
    out = tester.test(module, datamodule=datamodule, verbose=False)
    results = {
        "status": "ok",
        "source": source,
        "data_root": str(splits.root),
        "split": split,
        "num_images": len(splits.samples[split]),
        "test": {k: float(v) for k, v in out[0].items()},
        "class_names": meta.class_names,
        "monitor_value": float(out[0]["test/acc"]),
    }
    if tta != "none":  # the same images without and with the views, each pass timed
        results["tta"] = _tta_gain(cfg, net, splits.samples[split], meta.preprocessing, tta)
    path = output_dir() / "results.json"
    write_json(path, results)
    scores = ", ".join(f"{key} {float(value):.4f}" for key, value in sorted(out[0].items()))
    log.info("%s on %s (%d images): %s", source, _described(splits, split), len(splits.samples[split]), scores)
    log.info("results: %s", path)
    return results


def scored_split(splits: DataSplits, asked: str | None, source: str) -> str:
    """The split eval scores (`asked`, else test where there is one, else val), refused when it has no image."""
    split = asked or ("test" if "test" in splits.samples else "val")
    if split not in splits.samples:
        raise DataError(f"{splits.root} has no {split!r} split; it has {sorted(splits.samples)}. Fix: e.g. split=val.")
    if not splits.samples[split]:
        raise DataError(
            f"The {split} split of {splits.root} holds no image, so {source} has nothing to be scored on (a k-fold "
            "refit trains on every image of the pool: its val is empty). Fix: data.root=DIR with held-out images "
            "in DIR/test/<class>/."
        )
    return split


def _tta_gain(
    cfg: DictConfig, net: torch.nn.Module, samples: list[tuple[str, int]], pre: Preprocessing, tta: str
) -> dict[str, Any]:
    """results.json's `tta`: accuracy and balanced accuracy with and without `tta`, and the time each pass took."""
    cuda = torch.cuda.is_available() and str(cfg.trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda")
    batch_size = int(cfg.data.eval_batch_size or cfg.data.batch_size)
    gain = compare_tta(net, samples, pre, tta, device="cuda" if cuda else "cpu", batch_size=batch_size)
    log.info(
        "tta=%s (%d views): acc %.4f (without: %.4f), bal_acc %.4f (without: %.4f), %.1fx the time",
        tta, gain["views"], gain["acc"]["tta"], gain["acc"]["plain"], gain["bal_acc"]["tta"],
        gain["bal_acc"]["plain"], gain["time_ratio"],
    )  # fmt: skip
    return gain


def _described(splits: DataSplits, split: str) -> str:
    """Where the scored images are: a split's folder, or the part of the class folders a flat layout set aside."""
    if splits.layout == "split":
        return str(splits.root / split)
    fraction = splits.test_fraction if split == "test" else splits.val_fraction
    return (
        f"the {split} split of {splits.root} ({fraction:.0%} of each class folder, drawn with "
        f"data.split_seed={splits.split_seed})"
    )

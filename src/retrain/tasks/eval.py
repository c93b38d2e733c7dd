"""Eval: score any saved artifact on a folder, with the classes and transforms recorded in the artifact."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from retrain.artifacts.sources import load_source
from retrain.errors import ArtifactError, DataError
from retrain.model.module import ClassifierModule
from retrain.model.resnet import build_resnet
from retrain.model.surgery import load_weights
from retrain.tasks.common import find_splits, make_datamodule, make_loggers, single_device_trainer
from retrain.utils.hydra import output_dir
from retrain.utils.io import write_json

log = logging.getLogger("retrain")


def load_classifier(source: str, *, model_dir: Path, allow_pickle: bool) -> tuple[ClassifierModule, dict[str, Any]]:
    """Rebuild the model an artifact describes (arch, classes) and load its weights; returns it with the metadata."""
    artifact = load_source(source, model_dir=model_dir, allow_pickle=allow_pickle)
    meta = artifact.metadata or {}
    missing = [key for key in ("arch", "class_names", "preprocessing") if key not in meta]
    if missing:
        raise ArtifactError(
            f"{source} carries no retrain metadata ({', '.join(missing)} missing), so its classes and preprocessing "
            "are unknown. Expected a file written by retrain (.ckpt, .safetensors or a registry version). "
            f"Fix: retrain from it first (python train.py model.init_from={source} data.root=DIR)."
        )
    net = build_resnet(meta["arch"], len(meta["class_names"]))
    load_weights(net, artifact.state_dict, source=source, replace_head=False)
    return ClassifierModule(net, meta["class_names"]), meta


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test an artifact on data.root's test split (val when there is none) and write results.json."""
    module, meta = load_classifier(
        str(cfg.ckpt_path), model_dir=Path(cfg.paths.model_dir), allow_pickle=cfg.allow_pickle
    )
    recorded = meta.get("dataset") or {}
    same_root = Path(str(cfg.data.root)).expanduser().resolve() == Path(recorded.get("root", "/nonexistent"))
    splits = find_splits(cfg.data, recorded if same_root else None)
    if splits.class_names != meta["class_names"]:
        raise DataError(
            f"The classes in {cfg.data.root} ({splits.class_names}) differ from the model's "
            f"({meta['class_names']}). Expected the same class folders the model was trained on. "
            "Fix: evaluate on a folder with those classes, or retrain with model.init_from on this one."
        )
    split = cfg.split or ("test" if "test" in splits.samples else "val")
    if split not in splits.samples:
        raise DataError(f"{cfg.data.root} has no {split!r} split; it has {sorted(splits.samples)}.")
    splits.samples["test"] = splits.samples[split]
    datamodule = make_datamodule(splits, cfg.data, image_size=meta["preprocessing"]["image_size"], augment="none")
    tester = single_device_trainer(cfg.trainer, make_loggers(cfg))
    out = tester.test(module, datamodule=datamodule, verbose=False)
    results = {
        "status": "ok",
        "source": str(cfg.ckpt_path),
        "data_root": str(splits.root),
        "split": split,
        "num_images": len(splits.samples[split]),
        "test": {k: float(v) for k, v in out[0].items()},
        "class_names": meta["class_names"],
        "monitor_value": float(out[0]["test/acc"]),
    }
    write_json(output_dir() / "results.json", results)
    log.info("%s on %s/%s: %s", cfg.ckpt_path, cfg.data.root, split, results["test"])
    return results

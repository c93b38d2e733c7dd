"""Predict: top-k labels for an image, a folder or a glob, from any artifact or exported file."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track
from torch.utils.data import DataLoader

from retrain.errors import ConfigError, DataError
from retrain.inference.deploy_info import deploy_info
from retrain.inference.inputs import PredictImages, find_images
from retrain.inference.predictions import output_format, top_k, write_predictions
from retrain.inference.runtimes import Runtime, detect_kind, eager_runtime, load_runtime
from retrain.model.loading import load_trained
from retrain.utils.hydra import output_dir
from retrain.utils.io import write_json

log = logging.getLogger("retrain")


def load_predictor(source: str, *, model_dir: Path, allow_pickle: bool) -> Runtime:
    """An exported file (.onnx, TorchScript, .pt2) in its own runtime, or any other SOURCE as the eager model."""
    if detect_kind(Path(source).expanduser()) is not None:
        return load_runtime(Path(source).expanduser())
    net, meta = load_trained(source, model_dir=model_dir, allow_pickle=allow_pickle)
    return eager_runtime(net, deploy_info(meta.to_dict(), source))


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Write one row per image (path, top-k labels and probabilities, error); fail only if none could be read."""
    k = int(cfg.predict.top_k)
    if k < 1:
        raise ConfigError(f"predict.top_k={k}; expected 1 or more labels per image. Fix: e.g. predict.top_k=5.")
    output = Path(str(cfg.output)).expanduser().resolve()
    fmt = output_format(output, cfg.predict.format)
    paths = find_images(str(cfg.input))
    runtime = load_predictor(str(cfg.ckpt_path), model_dir=Path(cfg.paths.model_dir), allow_pickle=cfg.allow_pickle)
    class_names = runtime.info["class_names"]
    k = min(k, len(class_names))
    dataset = PredictImages(paths, runtime.info["preprocessing"], fast_decode=cfg.predict.fast_decode)
    workers = cfg.predict.num_workers
    # One core stays with the model; loader workers decode the images meanwhile.
    workers = max(0, min(8, (os.cpu_count() or 1) - 1)) if workers is None else int(workers)
    loader = DataLoader(dataset, batch_size=int(cfg.predict.batch_size), num_workers=workers)
    show = bool(cfg.predict.progress) and len(loader) > 1
    rows: list[dict[str, Any]] = []
    batches = track(loader, description="predicting", console=Console(file=sys.stderr), disable=not show)
    for images, errors in batches:
        ok = [i for i, error in enumerate(errors) if not error]
        logits = runtime.predict(images[ok]) if ok else torch.empty(0, len(class_names))
        ranked = iter(top_k(logits, class_names, k))
        for error in errors:
            rows.append({"path": str(paths[len(rows)]), "top_k": [] if error else next(ranked), "error": error or None})
    write_predictions(rows, output, fmt, k)
    failed = [row for row in rows if row["error"]]
    results = {
        "status": "ok" if len(failed) < len(rows) else "failed",
        "source": str(cfg.ckpt_path),
        "runtime": runtime.kind,
        "input": str(cfg.input),
        "output": str(output),
        "images": len(rows),
        "predicted": len(rows) - len(failed),
        "errors": len(failed),
    }
    write_json(output_dir() / "results.json", results)
    log.info("%d of %d images predicted (%s runtime) -> %s", results["predicted"], len(rows), runtime.kind, output)
    for row in failed[:10]:
        log.warning("could not read %s: %s", row["path"], row["error"])
    if len(failed) == len(rows):
        raise DataError(
            f"None of the {len(rows)} images from input={cfg.input} could be read (first: {failed[0]['path']}: "
            f"{failed[0]['error']}). Every row of {output} holds its error. Expected readable images. "
            "Fix: check the files, or point input= to a folder of images."
        )
    return results

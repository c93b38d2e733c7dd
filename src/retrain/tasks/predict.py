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

from retrain.errors import ArtifactError, ConfigError, DataError
from retrain.inference.deploy_info import deploy_info
from retrain.inference.inputs import PredictImages, find_images
from retrain.inference.predictions import output_format, top_k, write_predictions
from retrain.inference.runtimes import Runtime, detect_kind, eager_runtime, load_runtime
from retrain.inference.tta import averaged_probs, check_tta
from retrain.model.loading import load_trained
from retrain.utils.hydra import output_dir
from retrain.utils.io import write_json

log = logging.getLogger("retrain")
# The error of a row whose scores are not finite: a model with broken weights (or export) has no answer to give.
NON_FINITE = "the model's scores are NaN or inf: no answer"


def load_predictor(source: str, *, model_dir: Path, allow_pickle: bool) -> Runtime:
    """An exported file (.onnx, TorchScript, .pt2) in its own runtime, or any other SOURCE as the eager model."""
    if detect_kind(Path(source).expanduser()) is not None:
        return load_runtime(Path(source).expanduser())
    net, meta = load_trained(source, model_dir=model_dir, allow_pickle=allow_pickle)
    return eager_runtime(net, deploy_info(meta, source))


def _output_path(cfg: DictConfig) -> Path:
    """Where the predictions go: `output=` as given, else preds.csv (preds.json) in this run's own folder."""
    if cfg.output is None:  # never over an earlier run's file in the current folder
        return output_dir() / ("preds.json" if str(cfg.predict.format).lower() == "json" else "preds.csv")
    output = Path(str(cfg.output)).expanduser().resolve()
    if output.is_dir():
        raise ConfigError(
            f"output={cfg.output} is a folder ({output}); expected the file to write the predictions to. "
            f"Fix: output={output / 'preds.csv'}, or leave output unset for preds.csv in the run folder."
        )
    return output


def _check_loader_settings(settings: DictConfig) -> None:
    """Refuse a batch size or worker count torch's DataLoader would reject with a traceback, before the model loads."""
    batch, workers = settings.batch_size, settings.num_workers
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(
            f"predict.batch_size={batch}; expected 1 or more images per batch. Fix: e.g. predict.batch_size=32."
        )
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ConfigError(
            f"predict.num_workers={workers}; expected 0 (decode in the main process) or more loader processes, "
            "or null (cores - 1). Fix: e.g. predict.num_workers=2 or predict.num_workers=null."
        )


def _scores(runtime: Runtime, images: torch.Tensor, tta: str) -> torch.Tensor:
    """Logits; with `tta`, the log of the views' averaged probabilities (top_k's softmax gives those back)."""
    if tta == "none":
        return runtime.predict(images)
    return averaged_probs(runtime.predict, images, tta, runtime.info.preprocessing.crop).log()


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Write one row per image (path, top-k labels and probabilities, error); fail only if none could be read."""
    k = int(cfg.predict.top_k)
    if k < 1:
        raise ConfigError(f"predict.top_k={k}; expected 1 or more labels per image. Fix: e.g. predict.top_k=5.")
    _check_loader_settings(cfg.predict)
    output = _output_path(cfg)
    fmt = output_format(output, cfg.predict.format)
    paths = find_images(str(cfg.input))
    runtime = load_predictor(str(cfg.ckpt_path), model_dir=Path(cfg.paths.model_dir), allow_pickle=cfg.allow_pickle)
    tta = check_tta(cfg.get("tta"), runtime.info.preprocessing, source=str(cfg.ckpt_path))
    class_names = runtime.info.class_names
    k = min(k, len(class_names))
    dataset = PredictImages(paths, runtime.info.preprocessing, fast_decode=cfg.predict.fast_decode, tta=tta)
    workers = cfg.predict.num_workers
    # One core stays with the model; loader workers decode the images meanwhile.
    workers = max(0, min(8, (os.cpu_count() or 1) - 1)) if workers is None else workers
    loader = DataLoader(dataset, batch_size=cfg.predict.batch_size, num_workers=workers)
    show = bool(cfg.predict.progress) and len(loader) > 1
    rows: list[dict[str, Any]] = []
    batches = track(loader, description="predicting", console=Console(file=sys.stderr), disable=not show)
    for images, errors in batches:
        ok = [i for i, error in enumerate(errors) if not error]
        logits = _scores(runtime, images[ok], tta) if ok else torch.empty(0, len(class_names))
        finite = torch.isfinite(logits).all(dim=1)
        ranked, scored = iter(top_k(logits[finite], class_names, k)), iter(finite.tolist())
        for error in errors:
            error = error or (None if next(scored) else NON_FINITE)
            rows.append({"path": str(paths[len(rows)]), "top_k": [] if error else next(ranked), "error": error})
    if output.exists():
        log.warning("replacing %s (output= names an existing file)", output)
    write_predictions(rows, output, fmt, k)
    failed = [row for row in rows if row["error"]]
    broken = [row for row in failed if row["error"] == NON_FINITE]
    results = {
        "status": "ok" if len(failed) < len(rows) and not broken else "failed",
        "source": str(cfg.ckpt_path),
        "runtime": runtime.kind,
        "tta": tta,
        "input": str(cfg.input),
        "output": str(output),
        "images": len(rows),
        "predicted": len(rows) - len(failed),
        "errors": len(failed),
    }
    write_json(output_dir() / "results.json", results)
    if len(rows) == 1 and not failed:  # one image: the answer itself, not only a file holding it
        print(f"{rows[0]['path']}: " + "  ".join(f"{label} {prob:.3f}" for label, prob in rows[0]["top_k"]))
    log.info("%d of %d images predicted (%s runtime) -> %s", results["predicted"], len(rows), runtime.kind, output)
    for row in [row for row in failed if row["error"] != NON_FINITE][:10]:
        log.warning("could not read %s: %s", row["path"], row["error"])
    if broken:
        raise ArtifactError(
            f"{cfg.ckpt_path} ({runtime.kind} runtime) gave NaN or inf scores for {len(broken)} of {len(rows)} "
            f"images (first: {broken[0]['path']}), so they have no label: their rows in {output} say so. Expected "
            "finite scores. Fix: predict with an earlier checkpoint or registry version of this model, or retrain "
            "it (training now stops at the first loss that is not finite)."
        )
    if len(failed) == len(rows):
        raise DataError(
            f"None of the {len(rows)} images from input={cfg.input} could be read (first: {failed[0]['path']}: "
            f"{failed[0]['error']}). Every row of {output} holds its error. Expected readable images. "
            "Fix: check the files, or point input= to a folder of images."
        )
    return results

"""Publish a finished run as a registry version: every format, its metadata and report, moved into place at once.

A version holds what retraining and shipping need, not the optimizer: model.safetensors (metadata in its header,
never unpickled), weights.pth (a plain state_dict for torchvision), metadata.json (with every file's SHA-256,
see integrity.py), results.json and report/. The run folder keeps the full checkpoint for resuming; metadata names
it (``checkpoint_path``, ``checkpoint_sha256``). In a sweep with ``sweep.publish=best`` a job keeps its model in
its run folder instead (``keep_for_sweep``), and the sweep publishes the best job's at its end (``publish_kept``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrain.artifacts import registry
from retrain.artifacts.formats import (
    read_artifact,
    reporting_disk_full,
    save_full_model,
    save_safetensors,
    save_weights_pth,
    tensor_bytes,
)
from retrain.artifacts.integrity import MARKER, MARKER_KEY
from retrain.utils.io import read_json, write_json

KEPT_DIR = "kept_for_sweep"  # in a sweep job's run folder: its model, until the sweep publishes the best one
_KEPT_TARGET = "target.json"  # where the kept model goes: the job's paths.model_dir and name
FULL_MODEL_FILE = "model_full.pt"


def _final_metadata(metadata: dict[str, Any], best_checkpoint: Path | None, results: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's metadata with the final metrics and results, and where the resumable checkpoint is."""
    meta = dict(metadata)
    if best_checkpoint:
        checkpoint = read_artifact(best_checkpoint)  # hashes it, too
        meta = checkpoint.metadata or meta
        meta["checkpoint_path"] = str(Path(best_checkpoint).resolve())
        meta["checkpoint_sha256"] = checkpoint.sha256
    meta["metrics"] = {**meta.get("metrics", {}), **results["test"]}
    meta["results"] = {k: results[k] for k in ("monitor", "monitor_value", "best_epoch", "test")}
    meta[MARKER_KEY] = MARKER  # this version records its files' hashes: a metadata.json without them is refused
    return meta


def _folder_bytes(path: Any) -> int:
    if not path or not Path(path).is_dir():
        return 0
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _fill_and_publish(
    reservation: registry.Reservation,
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    results: dict[str, Any],
    full_model: nn.Module | Path | None,
) -> dict[str, Any]:
    """Write every file of the version into its staging folder and publish it; on any failure, abandon it."""
    staging = reservation.staging
    label = f"{reservation.name}@{registry.version_dirname(reservation.version)}"
    needed = (
        2 * tensor_bytes(state)
        + _folder_bytes(results.get("report"))
        + _folder_bytes((results.get("qat") or {}).get("out_dir"))
    )
    resume = results.get("last_checkpoint") or results.get("best_checkpoint")
    then = (
        f"rerun the same command with ckpt_path={resume}, which tests and publishes without training again"
        if resume
        else "train again"
    )
    intact = (
        f"Nothing was published: the earlier versions of {reservation.name} and its latest link are unchanged, "
        "and the run's checkpoints are intact."
    )
    try:
        with reporting_disk_full(staging.parent, needed, f"the registry version {label}", intact, then):
            save_weights_pth(state, staging / "weights.pth")
            save_safetensors(state, meta, staging / "model.safetensors")
            if isinstance(full_model, nn.Module):
                save_full_model(full_model, staging / FULL_MODEL_FILE)
            elif full_model is not None:
                shutil.copy2(full_model, staging / FULL_MODEL_FILE)
            write_json(staging / registry.METADATA_FILE, meta)
            write_json(staging / "results.json", results)
            if results.get("report"):
                shutil.copytree(results["report"], staging / "report")
            if results.get("qat"):
                shutil.copytree(results["qat"]["out_dir"], staging / "exports")
            final = registry.publish(reservation)
    except BaseException:
        registry.abandon(reservation)
        raise
    return {"name": reservation.name, "version": reservation.version, "path": str(final)}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def publish_version(
    reservation: registry.Reservation,
    model: nn.Module,
    metadata: dict[str, Any],
    best_checkpoint: Path | None,
    results: dict[str, Any],
    *,
    full_model: bool = False,
) -> dict[str, Any]:
    """Fill the reserved staging folder, then rename it into place, so readers never see half a version.

    On any failure (including Ctrl-C) the reservation is abandoned and nothing already published changes.
    """
    try:
        meta = _final_metadata(metadata, best_checkpoint, results)
    except BaseException:
        registry.abandon(reservation)
        raise
    return _fill_and_publish(reservation, _state(model), meta, results, model if full_model else None)


def keep_for_sweep(
    run_dir: Path,
    model: nn.Module,
    metadata: dict[str, Any],
    best_checkpoint: Path | None,
    results: dict[str, Any],
    *,
    model_dir: Path,
    name: str,
    full_model: bool = False,
) -> Path:
    """Keep what publishing needs in a sweep job's run folder, so the sweep can publish only its best job."""
    kept = Path(run_dir) / KEPT_DIR
    kept.mkdir(parents=True, exist_ok=True)
    meta = _final_metadata(metadata, best_checkpoint, results)
    with reporting_disk_full(
        kept, tensor_bytes(_state(model)), "the model kept for the sweep's end", "Nothing was published.", "run again"
    ):
        save_safetensors(_state(model), meta, kept / "model.safetensors")
        if full_model:
            save_full_model(model, kept / FULL_MODEL_FILE)
        write_json(kept / _KEPT_TARGET, {"model_dir": str(Path(model_dir).resolve()), "name": name})
    return kept


def has_kept(run_dir: Path) -> bool:
    """Whether a sweep job left a model to publish (it ran to the end with sweep.publish=best)."""
    return (Path(run_dir) / KEPT_DIR / _KEPT_TARGET).is_file()


def publish_kept(run_dir: Path) -> dict[str, Any]:
    """Publish the model a sweep job kept as the next version of its name; its results.json then names it."""
    run_dir = Path(run_dir)
    kept = run_dir / KEPT_DIR
    target = read_json(kept / _KEPT_TARGET)
    artifact = read_artifact(kept / "model.safetensors")
    results = read_json(run_dir / "results.json")
    reservation = registry.reserve_version(Path(target["model_dir"]), str(target["name"]))
    meta = {**(artifact.metadata or {}), "name": reservation.name, "version": reservation.version}
    full_model = kept / FULL_MODEL_FILE if (kept / FULL_MODEL_FILE).is_file() else None
    published = _fill_and_publish(reservation, artifact.state_dict, meta, results, full_model)
    write_json(run_dir / "results.json", {**results, "registry": published})
    shutil.rmtree(kept)
    return published


def drop_kept(run_dir: Path) -> None:
    """Remove a sweep job's kept model once the sweep has published its winner (or publishes nothing)."""
    shutil.rmtree(Path(run_dir) / KEPT_DIR, ignore_errors=True)

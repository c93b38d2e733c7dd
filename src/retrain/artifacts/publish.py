"""Publish a finished run as a registry version: every format, its metadata and report, moved into place at once."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

from retrain.artifacts import registry
from retrain.artifacts.formats import read_artifact, save_full_model, save_safetensors, save_weights_pth
from retrain.utils.io import sha256_file, write_json


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
    staging = reservation.staging
    try:
        meta = dict(metadata)
        if best_checkpoint:
            shutil.copy2(best_checkpoint, staging / "model.ckpt")
            meta = read_artifact(best_checkpoint).metadata or meta
            meta["checkpoint_sha256"] = sha256_file(staging / "model.ckpt")
        meta["metrics"] = {**meta.get("metrics", {}), **results["test"]}
        meta["results"] = {k: results[k] for k in ("monitor", "monitor_value", "best_epoch", "test")}
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_weights_pth(state, staging / "weights.pth")
        save_safetensors(state, meta, staging / "model.safetensors")
        if full_model:
            save_full_model(model, staging / "model_full.pt")
        write_json(staging / "metadata.json", meta)
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

"""What every saved file carries: who made it, from what, with which software.

Kept free of torch and lightning imports so the registry CLI starts fast.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA = 1


def software_versions() -> dict[str, str]:
    """Record the versions that produced an artifact, so a failing reload can be traced to an upgrade."""
    versions = {"python": platform.python_version()}
    # importlib.metadata reads the installed package records without importing lightning (~7 s).
    for dist in ("torch", "torchvision", "lightning", "retrain"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def git_commit(start: Path | None = None) -> str | None:
    """Return the HEAD commit of the code that trained a model, or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=start or Path.cwd(),
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = result.stdout.strip()
    return sha if result.returncode == 0 and sha else None


def new_metadata(
    *,
    name: str,
    version: int,
    arch: str,
    class_names: list[str],
    preprocessing: dict[str, Any],
    augment: str,
    config: dict[str, Any],
    dataset: dict[str, Any],
    parent: dict[str, Any] | None,
    freeze: list[str],
    train_bn: bool,
) -> dict[str, Any]:
    """Build the metadata dict every artifact carries, so it can be reloaded without the config that made it.

    The result is JSON-plain (tuples become lists), so it also loads under ``torch.load(weights_only=True)``.
    """
    metadata = {
        "schema": SCHEMA,
        "name": name,
        "version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "arch": arch,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "preprocessing": preprocessing,
        "augment": augment,
        "config": config,
        "dataset": dataset,
        "metrics": {},
        "epoch": None,
        "global_step": None,
        "software": software_versions(),
        "git_commit": git_commit(),
        "parent": parent,
        "freeze": list(freeze),
        "train_bn": train_bn,
    }
    plain: dict[str, Any] = json.loads(json.dumps(metadata))
    return plain

"""What every saved file carries: who made it, from what, with which software, and small file helpers.

Kept free of torch and lightning imports so the registry CLI starts fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import secrets
import subprocess
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from retrain.errors import ArtifactError

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


def sha256_file(path: Path) -> str:
    """Hash a file in chunks so lineage records identify the exact parent bytes without loading them whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def atomic_write(
    path: Path, write: Callable[[IO[bytes]], object], *, before_replace: Callable[[], None] | None = None
) -> None:
    """Write a file so that readers see the old file or the new one, never half of one, even after a kill.

    ``write`` fills a temp file in the same folder (same filesystem, so ``os.replace`` is atomic); it is
    flushed and fsynced, then renamed over ``path``; the folder is fsynced so the rename survives a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its 0600 mode would make shared registry files unreadable to other users.
    while True:
        tmp_name = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    # Best effort: some filesystems (and Windows) cannot open or fsync a folder.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically, so a crash never leaves a truncated metadata.json or results.json."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, turning a missing or damaged file into an ArtifactError that says what to do."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(
            f"{path} does not exist. Expected a JSON file written by retrain. "
            "Fix: check the path, or re-create the artifact by training again."
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(
            f"{path} could not be read as UTF-8 text ({e}). Expected a JSON file written by retrain. "
            "Fix: restore the file from a backup or re-create it by training again."
        ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}). Expected a "
            "JSON object written by retrain. Fix: restore the file from a backup or re-create it by "
            "training again."
        ) from None
    if not isinstance(obj, dict):
        raise ArtifactError(
            f"{path} holds a JSON {type(obj).__name__}, expected a JSON object. "
            "Fix: point to the metadata.json or results.json that retrain wrote."
        )
    return obj

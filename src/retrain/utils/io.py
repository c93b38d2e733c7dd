"""Files written safely and read with clear errors: atomic writes, JSON, hashing. No torch, no package imports
beyond errors, so every layer (the registry CLI, sweeps, failure records) can use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from retrain.errors import ArtifactError


def sha256_file(path: Path) -> str:
    """Hash a file in chunks so lineage records identify the exact parent bytes without loading them whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically: parallel sweep jobs and readers never see half a file."""
    atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically, so a crash never leaves a truncated metadata.json or results.json."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


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

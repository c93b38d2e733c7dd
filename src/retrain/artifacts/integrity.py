"""Registry versions that cannot change unnoticed: each file's SHA-256 is recorded at publish and checked on load.

``registry.publish`` records the size and SHA-256 of every file of a version under ``files`` in its
metadata.json. metadata.json cannot hold its own hash, so it is checked another way: publish writes the same
metadata into the header of model.safetensors (whose bytes are hashed), and the two must agree in everything but
``files``. An edited metadata.json (swapped class names, say) therefore disagrees with the header, and edited
weights disagree with their hash. ``exports/`` is not recorded: export.py writes it after publishing.
Torch-free, so ``retrain registry verify`` starts fast.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrain.errors import ArtifactError
from retrain.utils.io import read_json, sha256_file, write_json

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
SAFETENSORS_FILE = "model.safetensors"
FILES_KEY = "files"  # in metadata.json only: {relative path: {"sha256": ..., "bytes": ...}}
# Set by publish_version in both copies of the metadata, so a metadata.json stripped of its `files` is noticed.
MARKER_KEY = "file_hashes"
MARKER = "sha256"
UNRECORDED = ("exports",)  # top-level folders written into a version after publishing
_NOT_HASHED = (METADATA_FILE, ".owner.json")  # checked against the header instead; run bookkeeping
_SHOWN = 200  # characters of a value quoted in an error


def _hashed_files(folder: Path) -> list[Path]:
    """The files of a version folder that carry a recorded hash, in a stable order."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and path.relative_to(folder).parts[0] not in UNRECORDED
        and path.relative_to(folder).as_posix() not in _NOT_HASHED
    )


def record_files(folder: Path) -> dict[str, dict[str, Any]]:
    """The size and SHA-256 of every file in a version folder, by relative path, as metadata.json records them."""
    return {
        path.relative_to(folder).as_posix(): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in _hashed_files(folder)
    }


def seal(staging: Path) -> None:
    """Record every file's hash in the staging folder's metadata.json, just before it is published."""
    metadata = read_json(staging / METADATA_FILE)
    metadata[FILES_KEY] = record_files(staging)
    write_json(staging / METADATA_FILE, metadata)


def _label(folder: Path) -> str:
    return f"{folder.parent.name}@{folder.name}"


def _fix(folder: Path) -> str:
    return (
        f"Fix: restore the version from a backup or a copy of the registry, or use another version "
        f"(`retrain registry verify {folder.parent.name}` says which are intact)."
    )


def _file_problem(folder: Path, relative: str, recorded: Any, sha256: str | None = None) -> str | None:
    """What is wrong with one recorded file (None: nothing); hashes it unless `sha256` is already known."""
    path = folder / relative
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        return f"{path}: metadata.json records no SHA-256 for it (found {str(recorded)[:_SHOWN]})."
    if not path.is_file():
        return f"{path} is missing; metadata.json records it ({recorded.get('bytes')} bytes) as part of the version."
    found = sha256_file(path) if sha256 is None else sha256
    if found != recorded["sha256"]:
        return (
            f"{path} changed since it was published: its SHA-256 is {found} ({path.stat().st_size} bytes), "
            f"expected {recorded['sha256']} ({recorded.get('bytes')} bytes) as metadata.json records."
        )
    return None


def _canonical(value: Any) -> str:
    # JSON text, not ==, so that a NaN metric equals itself.
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _quoted(value: Any) -> str:
    text = _canonical(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def header_metadata(path: Path) -> dict[str, Any] | None:
    """The retrain metadata in a safetensors file's header (None when it has none), read without torch."""
    from safetensors import safe_open  # the numpy backend: no torch import for `retrain registry verify`

    try:
        with safe_open(str(path), framework="numpy") as f:
            text = (f.metadata() or {}).get("retrain")
        return None if text is None else dict(json.loads(text))
    except Exception as e:  # SafetensorError, damaged JSON: report, never a raw traceback
        raise ArtifactError(
            f"{path} has an unreadable header ({type(e).__name__}: {str(e)[:_SHOWN]}). Expected the safetensors "
            f"file retrain wrote when the version was published. {_fix(path.parent)}"
        ) from None


def metadata_problem(folder: Path, metadata: dict[str, Any], header: dict[str, Any] | None) -> str | None:
    """Where metadata.json disagrees with the copy publish wrote into model.safetensors (None: they agree)."""
    if header is None:
        return None
    found = {k: v for k, v in metadata.items() if k != FILES_KEY}
    differ = sorted(k for k in set(found) | set(header) if _canonical(found.get(k)) != _canonical(header.get(k)))
    if not differ:
        return None
    differ.sort(key=lambda k: k != "class_names")  # the one that relabels every prediction goes first
    details = "; ".join(
        f"{k} is {_quoted(found.get(k))} in metadata.json, expected {_quoted(header.get(k))}" for k in differ[:4]
    )
    more = f" (and {len(differ) - 4} more keys)" if len(differ) > 4 else ""
    consequence = (
        " With these class names every prediction would carry another class's label." if "class_names" in differ else ""
    )
    return (
        f"{folder / METADATA_FILE} was changed after {_label(folder)} was published: it disagrees with the copy "
        f"written into {SAFETENSORS_FILE} at publish time: {details}{more}.{consequence}"
    )


def check_loaded(folder: Path, loaded: Path, sha256: str, metadata: dict[str, Any]) -> None:
    """Refuse a version whose loaded file or metadata.json differs from what was published, naming both values.

    ``loaded`` is the file just read from ``folder`` (its hash ``sha256`` is already known); model.safetensors
    is hashed too when metadata.json is compared with its header. A version published before hashes were
    recorded loads with a warning.
    """
    files = metadata.get(FILES_KEY)
    if not isinstance(files, dict):
        if metadata.get(MARKER_KEY) == MARKER:
            raise ArtifactError(
                f"{folder / METADATA_FILE} has lost its record of file hashes ('{FILES_KEY}'), which every "
                f"version published with hashes keeps; expected a SHA-256 for each file. {_fix(folder)}"
            )
        log.warning("%s records no file hashes (published by an older retrain): its files are not verified", folder)
        return
    relative = loaded.relative_to(folder).as_posix()
    problem = (
        _file_problem(folder, relative, files[relative], sha256)
        if relative in files
        else f"{loaded} is not one of the files published in {_label(folder)} ({', '.join(sorted(files))})."
    )
    if problem is None and SAFETENSORS_FILE in files:
        if relative != SAFETENSORS_FILE:  # its header is compared below, so its bytes must be the published ones
            problem = _file_problem(folder, SAFETENSORS_FILE, files[SAFETENSORS_FILE])
        if problem is None:
            problem = metadata_problem(folder, metadata, header_metadata(folder / SAFETENSORS_FILE))
    if problem is not None:
        raise ArtifactError(f"Refusing to load {_label(folder)}: {problem} {_fix(folder)}")


@dataclass(frozen=True)
class VersionCheck:
    """What `retrain registry verify` found in one version: problems (empty: intact), or why it could not check."""

    folder: Path
    problems: tuple[str, ...]
    files: int
    size: int
    unverified: str | None = None  # set for versions published before file hashes were recorded

    @property
    def label(self) -> str:
        """The version as a reference, e.g. ``cats@v003``."""
        return _label(self.folder)


def verify_version(folder: Path) -> VersionCheck:
    """Check every file of a version against its recorded hash, and metadata.json against the weights' header."""
    try:
        metadata = read_json(folder / METADATA_FILE)
    except ArtifactError as e:
        return VersionCheck(folder, (str(e),), 0, 0)
    files = metadata.get(FILES_KEY)
    header = None
    problems: list[str] = []
    if (folder / SAFETENSORS_FILE).is_file():
        try:
            header = header_metadata(folder / SAFETENSORS_FILE)
        except ArtifactError as e:
            problems.append(str(e))
    if not isinstance(files, dict):
        if metadata.get(MARKER_KEY) == MARKER:
            problems.append(f"{folder / METADATA_FILE} has lost its record of file hashes ('{FILES_KEY}').")
        problem = metadata_problem(folder, metadata, header)
        problems.extend([problem] if problem else [])
        unverified = None if problems else "no file hashes recorded (published by an older retrain)"
        return VersionCheck(folder, tuple(problems), 0, 0, unverified)
    problems.extend(p for rel, rec in files.items() if (p := _file_problem(folder, rel, rec)))
    extra = [path for path in _hashed_files(folder) if path.relative_to(folder).as_posix() not in files]
    problems.extend(f"{path} was added after publishing; it is not one of the version's files." for path in extra)
    problem = metadata_problem(folder, metadata, header)
    problems.extend([problem] if problem else [])
    size = sum(int(rec.get("bytes") or 0) for rec in files.values() if isinstance(rec, dict))
    return VersionCheck(folder, tuple(problems), len(files), size)

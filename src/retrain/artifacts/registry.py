"""The local versioned model registry: ``${model_dir}/<name>/v003/`` folders, ``latest`` and lineage.

A version is reserved as a hidden staging folder ``<name>/.v003.partial`` (``os.mkdir`` is atomic, so two
processes never get the same number), filled by the caller, then published with one ``os.rename`` to
``<name>/v003``; readers therefore never see half a version. ``<name>/latest`` is a relative symlink
(``latest -> v003``), replaced atomically with ``os.replace`` under a file lock and only by a newer version;
when it is missing (e.g. the registry was copied without symlinks) readers fall back to the newest vNNN.
A reservation records its owner (pid, host) in ``.owner.json``, so ``gc`` (registry_gc.py) can remove the staging
folders of killed runs without touching one a live process holds; numbers are never reused (``.high_water``).
A run removes its own reservation when it fails (``held``). Publishing records every file's hash (integrity.py).
Kept free of torch so that ``retrain registry`` starts fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrain.artifacts.integrity import METADATA_FILE, seal
from retrain.artifacts.owners import owner_record
from retrain.errors import ArtifactError, RegistryError
from retrain.utils.io import atomic_write, read_json, write_json

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
VERSION_DIR_RE = re.compile(r"v(\d{3,})")
STAGING_RE = re.compile(r"\.v(\d{3,})\.partial")
TRASH_RE = re.compile(r"\.v(\d{3,})\.gc")  # a reservation gc has claimed and is deleting
_VERSION_REF_RE = re.compile(r"v?(\d+)")
LATEST = "latest"
OWNER_FILE = ".owner.json"
_HIGH_WATER = ".high_water"  # the highest number given up (gc, failed runs): reserve_version skips past it


@dataclass(frozen=True)
class Reservation:
    """A version number held by one writer, and the staging folder its files go into before publishing."""

    name: str
    version: int
    staging: Path


def version_dirname(version: int) -> str:
    """Spell a version as its folder name (``v003``), zero padded so folders sort in version order."""
    return f"v{version:03d}"


def check_name(name: str) -> None:
    """Refuse a model name that cannot be a folder name, saying what is allowed."""
    if not NAME_RE.fullmatch(name):
        raise RegistryError(
            f"Model name {name!r} cannot be used in the registry. Expected letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it becomes a folder name). Fix: choose a name such as "
            "'flowers' or 'cats-v-dogs'."
        )


def _published(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := VERSION_DIR_RE.fullmatch(p.name)) and p.is_dir())


def _taken(root: Path) -> list[int]:
    taken = _published(root)
    for p in root.iterdir():
        if m := STAGING_RE.fullmatch(p.name) or TRASH_RE.fullmatch(p.name):
            taken.append(int(m.group(1)))
    # Read after the listing: gc raises the mark before it removes a folder, so a folder missed above is counted here.
    taken.append(_high_water(root))
    return taken


def _high_water(root: Path) -> int:
    try:
        return int((root / _HIGH_WATER).read_text().strip())
    except (OSError, ValueError):
        return 0


def raise_high_water(root: Path, version: int) -> None:
    """Record that numbers up to `version` are used up, so reserve_version never hands them out again."""
    with _lock(root):
        if _high_water(root) < version:
            atomic_write(root / _HIGH_WATER, lambda f: f.write(f"{version}\n".encode()))


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    with open(root / ".latest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write_owner(staging: Path) -> None:
    write_json(staging / OWNER_FILE, owner_record())


def reserve_version(model_dir: Path, name: str) -> Reservation:
    """Claim the next version number of ``name`` for this writer only, with a staging folder to fill."""
    check_name(name)
    root = Path(model_dir) / name
    if problem := _latest_problem(root):  # found now, not after hours of training
        raise RegistryError(problem)
    try:
        root.mkdir(parents=True, exist_ok=True)
        number = max(_taken(root), default=0) + 1
        while True:
            staging = root / f".{version_dirname(number)}.partial"
            try:
                os.mkdir(staging)
            except FileExistsError:
                number += 1
                continue
            # Another writer may have published this number (or gc removed it) between our listing and our mkdir.
            if (root / version_dirname(number)).exists() or _high_water(root) >= number:
                os.rmdir(staging)
                number = max(number, _high_water(root)) + 1
                continue
            try:
                _write_owner(staging)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            return Reservation(name, number, staging)
    except OSError as e:
        raise RegistryError(
            f"Cannot write the model registry at {root} ({e.strerror or e}: {e.filename or root}). "
            "Expected a writable folder. Fix: set paths.model_dir (or RETRAIN_MODEL_DIR) to a writable "
            "folder, or remove the file that sits where that folder should be."
        ) from None


def publish(reservation: Reservation) -> Path:
    """Make a filled staging folder visible as ``<name>/vNNN`` and move ``latest`` to it if it is newer.

    All or nothing: on failure the earlier versions and ``latest`` are unchanged and the staging folder is
    left in place, so the caller can retry or ``abandon`` it.
    """
    staging = reservation.staging
    root = staging.parent
    final = root / version_dirname(reservation.version)
    if not (staging / METADATA_FILE).is_file():
        raise RegistryError(
            f"Cannot publish {reservation.name}@{version_dirname(reservation.version)}: {staging} has no "
            f"{METADATA_FILE}. Expected the staging folder to hold the model files and their metadata. "
            "Fix: write metadata.json into the staging folder before publishing."
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging / OWNER_FILE)  # run bookkeeping, not part of the model
    try:
        seal(staging)
    except BaseException:
        with contextlib.suppress(OSError):
            _write_owner(staging)
        raise
    try:
        os.rename(staging, final)
    except OSError as e:
        with contextlib.suppress(OSError):
            _write_owner(staging)
        raise RegistryError(
            f"Cannot publish {reservation.name}@{version_dirname(reservation.version)}: moving {staging} to "
            f"{final} failed ({e.strerror or e}). Earlier versions and latest are unchanged. "
            "Fix: check free space and permissions of the registry folder, then train again."
        ) from None
    try:
        _point_latest(root, reservation.version)
    except OSError as e:
        # Roll back, so a version is only ever visible together with a correct latest.
        with contextlib.suppress(OSError):
            os.rename(final, staging)
            _write_owner(staging)
        fix = _latest_problem(root) or f"Fix: check permissions of {root}, then train again."
        raise RegistryError(
            f"Cannot publish {reservation.name}@{version_dirname(reservation.version)}: updating "
            f"{root / LATEST} failed ({e.strerror or e}). Earlier versions and latest are unchanged; "
            f"the files stay in {staging}. {fix}"
        ) from None
    _announce_new_classes(root, reservation)
    return final


def _latest_problem(root: Path) -> str | None:
    """Why `latest` could not be moved to a new version (a real folder or file sits there), or None."""
    latest = root / LATEST
    if latest.is_symlink() or not latest.exists():
        return None
    what = "a real folder" if latest.is_dir() else "a regular file"
    return (
        f"{latest} is {what}, not the link to the newest version that retrain keeps there (copying a registry "
        "with `cp -aL` or a tool that follows links makes one), so no new version of "
        f"{root.name} can be published. Expected a symlink such as latest -> v003. Fix: check that it holds "
        f"nothing you need (it is a copy of one version), remove it (rm -r {latest}) and run again; "
        "the next publish puts the link back."
    )


def _point_latest(root: Path, version: int) -> None:
    # The lock makes read-compare-replace atomic, so concurrent publishers leave latest at the newest.
    with _lock(root):
        current = _latest_version(root)
        if current is not None and current >= version:
            return
        tmp = root / ".latest.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(version_dirname(version), tmp)
        try:
            os.replace(tmp, root / LATEST)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def _class_names(folder: Path) -> list[str] | None:
    try:
        names = read_json(folder / METADATA_FILE).get("class_names")
    except ArtifactError:
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def _shown(names: list[str], limit: int = 20) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return "[" + ", ".join(names[:limit]) + more + "]"


def _announce_new_classes(root: Path, reservation: Reservation) -> None:
    """Warn when a version's classes differ from the previous version's: code using name@latest sees new labels."""
    earlier = [v for v in _published(root) if v < reservation.version]
    if not earlier:
        return
    previous = root / version_dirname(earlier[-1])
    before, after = _class_names(previous), _class_names(root / version_dirname(reservation.version))
    if before is None or after is None or before == after:
        return
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    change = f"added {_shown(added)}" if added else ""
    change += ("; " if change and removed else "") + (f"removed {_shown(removed)}" if removed else "")
    label = f"{reservation.name}@{version_dirname(reservation.version)}"
    log.warning(
        "%s has a new class set: %s (%d classes) instead of %s@%s's %s (%d classes)%s. Code that loads "
        "%s@latest now gets these classes, in this index order.",
        label,
        _shown(after),
        len(after),
        reservation.name,
        previous.name,
        _shown(before),
        len(before),
        f": {change}" if change else ": the same names in another order",
        reservation.name,
    )


def _latest_version(root: Path) -> int | None:
    try:
        target = os.readlink(root / LATEST)
    except OSError:
        return None
    m = VERSION_DIR_RE.fullmatch(target)
    return int(m.group(1)) if m and (root / target).is_dir() else None


def keep_alive(reservation: Reservation) -> None:
    """Refresh the reservation's age, so that gc on another host (which judges by age) leaves a long run's alone."""
    with contextlib.suppress(OSError):  # a missed refresh only matters after --older-than-hours of silence
        os.utime(reservation.staging / OWNER_FILE)


@contextlib.contextmanager
def held(reservation: Reservation | None) -> Iterator[Reservation | None]:
    """Hold a run's reservation: when the run fails or is stopped (an exception, Ctrl-C, exit), abandon it.

    Without this a failed run leaves its ``.vNNN.partial`` for ``gc``. A published reservation is left alone.
    """
    try:
        yield reservation
    except BaseException:
        if reservation is not None and reservation.staging.exists():
            abandon(reservation)
        raise


def abandon(reservation: Reservation) -> None:
    """Drop a reservation whose run failed, so its half-written files never look like a model.

    Its number is not handed out again: the failed run's checkpoints already carry it in their names.
    """
    with contextlib.suppress(OSError):  # the run is failing already; the number is then merely reusable
        raise_high_water(reservation.staging.parent, reservation.version)
    shutil.rmtree(reservation.staging, ignore_errors=True)


def known_names(model_dir: Path) -> list[str]:
    """List the model names that have at least one published version."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(p.name for p in model_dir.iterdir() if NAME_RE.fullmatch(p.name) and _published(p))


def resolve(model_dir: Path, ref: str) -> Path:
    """Turn ``name@v3``, ``name@3``, ``name@latest`` or ``name`` into that version's folder."""
    model_dir = Path(model_dir)
    name, _, version_ref = ref.strip().partition("@")
    check_name(name)
    root = model_dir / name
    versions = _published(root)
    if not versions:
        names = known_names(model_dir)
        known = ", ".join(names) if names else "none yet"
        raise RegistryError(
            f"No model named {name!r} in the registry {model_dir} (known names: {known}). Expected a "
            "reference like name@v3, name@3 or name@latest. Fix: use one of the known names, or point "
            "--model-dir / RETRAIN_MODEL_DIR / paths.model_dir at the registry that holds it."
        )
    if version_ref in ("", LATEST):
        version = _latest_version(root) or versions[-1]
    elif m := _VERSION_REF_RE.fullmatch(version_ref):
        version = int(m.group(1))
    else:
        raise RegistryError(
            f"{ref!r} has an unknown version part {version_ref!r}. Expected name@v3, name@3 or name@latest. "
            f"Fix: use one of {name}@latest, " + ", ".join(f"{name}@{version_dirname(v)}" for v in versions)
        )
    if version not in versions:
        raise RegistryError(
            f"{name} has no version {version} in {model_dir}. Known versions: "
            + ", ".join(version_dirname(v) for v in versions)
            + f". Fix: use one of them, or {name}@latest."
        )
    return root / version_dirname(version)


def _parent_label(parent: Any) -> str | None:
    if not isinstance(parent, dict):
        return None
    if parent.get("name") and parent.get("version") is not None:
        return f"{parent['name']}@{version_dirname(int(parent['version']))}"
    label = parent.get("name") or parent.get("source") or parent.get("path")
    return str(label) if label else None


def list_versions(model_dir: Path, name: str | None = None) -> list[dict[str, Any]]:
    """Rows describing each published version (created, classes, monitored value, metrics, parent), oldest first.

    A version whose metadata.json is unreadable still gets a row, with the reason under ``problem``.
    """
    model_dir = Path(model_dir)
    if name is not None:
        resolve(model_dir, name)  # raises with the known names when there is no such model
    names = [name] if name is not None else known_names(model_dir)
    rows = []
    for model in names:
        root = model_dir / model
        latest = _latest_version(root)
        versions = _published(root)
        for version in versions:
            folder = root / version_dirname(version)
            row: dict[str, Any] = {
                "name": model,
                "version": version,
                "path": str(folder),
                "latest": version == (latest or versions[-1]),
                "created": None,
                "classes": [],
                "monitor": None,
                "monitor_value": None,
                "metrics": {},
                "parent": None,
                "problem": None,
            }
            try:
                metadata = read_json(folder / METADATA_FILE)
            except ArtifactError as e:
                row["problem"] = str(e)
            else:
                results = metadata.get("results")
                results = results if isinstance(results, dict) else {}
                row["created"] = metadata.get("created")
                row["classes"] = [str(n) for n in metadata.get("class_names") or []]
                row["monitor"] = results.get("monitor")
                row["monitor_value"] = results.get("monitor_value")
                row["metrics"] = dict(metadata.get("metrics") or {})
                row["parent"] = _parent_label(metadata.get("parent"))
            rows.append(row)
    return rows

"""Garbage collection of the registry: the staging folders that killed runs leave behind, and nothing else.

A reservation (``<name>/.v003.partial``) records its owner (see owners.py). It is abandoned when that owner
process on this host is gone, or, when the owner ran on another host or is unknown, when nothing in its folder
changed for ``older_than_hours`` (a training run refreshes it every epoch). A live owner's is never touched,
published versions and ``latest`` never are, and a removed number is never handed out again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple

from retrain.artifacts.owners import owner_gone, this_host
from retrain.artifacts.registry import (
    NAME_RE,
    OWNER_FILE,
    STAGING_RE,
    TRASH_RE,
    Reservation,
    check_name,
    raise_high_water,
    version_dirname,
)
from retrain.errors import ArtifactError
from retrain.utils.io import read_json

DEFAULT_GC_HOURS = 24.0
GC_COMMAND = "retrain registry gc"


class ReservationCheck(NamedTuple):
    """One row of gc's report: an unpublished reservation, whether it is abandoned, why (one line), what gc did.

    ``action`` is ``kept`` or ``would remove`` until gc acts; then ``kept``, ``removed`` or ``failed``.
    """

    reservation: Reservation
    abandoned: bool
    reason: str
    action: str


def _last_touched(folder: Path) -> float:
    # Writing the model files into staging refreshes these times, so a reservation being filled looks young.
    times = [folder.lstat().st_mtime]
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        times.extend(entry.stat(follow_symlinks=False).st_mtime for entry in entries)
    return max(times)


def _judge(folder: Path, older_than_hours: float, now: float, here: dict[str, str | None]) -> tuple[bool, str]:
    if TRASH_RE.fullmatch(folder.name):
        return True, "left behind by an interrupted gc"
    try:
        owner = read_json(folder / OWNER_FILE)
    except ArtifactError:
        owner = {}
    pid = owner.get("pid")
    if isinstance(pid, int) and pid > 0 and all(owner.get(key) == value for key, value in here.items()):
        return owner_gone(owner, pid)
    if isinstance(pid, int):
        who = f"owner pid {pid} on host {owner.get('host') or 'unknown'} (another host or container)"
    else:
        who = "no owner record"
    try:
        age = now - _last_touched(folder)
    except OSError:
        return False, f"{who}, cannot read its age"
    if age > older_than_hours * 3600:
        return True, f"{who}, untouched for {age / 3600:.1f} h (more than {older_than_hours:g} h)"
    return False, f"{who}, untouched for only {age / 3600:.1f} h (gc waits {older_than_hours:g} h for those)"


def _model_roots(model_dir: Path, name: str | None) -> list[Path]:
    model_dir = Path(model_dir)
    if name is not None:
        check_name(name)
        return [model_dir / name] if (model_dir / name).is_dir() else []
    if not model_dir.is_dir():
        return []
    return sorted(p for p in model_dir.iterdir() if NAME_RE.fullmatch(p.name) and p.is_dir())


def check_reservations(
    model_dir: Path, name: str | None = None, older_than_hours: float = DEFAULT_GC_HOURS
) -> list[ReservationCheck]:
    """Judge every unpublished reservation (one model's, or all), so gc and list agree on what is abandoned.

    Abandoned means: its owner process on this host is gone, or, when the owner ran on another host (or is
    unknown), nothing in its folder changed for ``older_than_hours``. A reservation of a live process is never so.
    """
    now, here = time.time(), this_host()
    checks = []
    for root in _model_roots(model_dir, name):
        for folder in sorted(root.iterdir()):
            if (m := STAGING_RE.fullmatch(folder.name) or TRASH_RE.fullmatch(folder.name)) and folder.is_dir():
                abandoned, reason = _judge(folder, older_than_hours, now, here)
                reservation = Reservation(root.name, int(m.group(1)), folder)
                checks.append(ReservationCheck(reservation, abandoned, reason, "would remove" if abandoned else "kept"))
    return checks


def collect_garbage(
    model_dir: Path, older_than_hours: float = DEFAULT_GC_HOURS, *, dry_run: bool = False
) -> list[ReservationCheck]:
    """Remove the staging folders of killed runs, which nothing else ever removes; one row per reservation.

    Published versions and ``latest`` are not touched, and a removed number is never handed out again.
    """
    checks = check_reservations(model_dir, None, older_than_hours)
    return checks if dry_run else [_remove(check) if check.abandoned else check for check in checks]


def _remove(check: ReservationCheck) -> ReservationCheck:
    folder, version = check.reservation.staging, check.reservation.version
    trash = folder.parent / f".{version_dirname(version)}.gc"
    try:
        raise_high_water(folder.parent, version)
        if folder != trash:
            # Claim it with one rename first: an owner that publishes at this moment wins or loses as a whole.
            os.rename(folder, trash)
        shutil.rmtree(trash)
    except FileNotFoundError:
        return check._replace(reason="gone meanwhile (published or removed)", action="kept")
    except OSError as e:
        return check._replace(reason=f"cannot remove: {e.strerror or e}", action="failed")
    return check._replace(action="removed")

"""Registry gc: reservations of killed runs are removed, live ones kept, and version numbers are never reused."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from clitools import RETRAIN

from retrain.artifacts.registry import OWNER_FILE, keep_alive, publish, reserve_version
from retrain.artifacts.registry_gc import ReservationCheck, check_reservations, collect_garbage
from retrain.cli.main import main as retrain_cli
from retrain.errors import RegistryError
from retrain.utils.io import write_json


def publish_new(model_dir: Path, name: str = "cats") -> Path:
    reservation = reserve_version(model_dir, name)
    write_json(reservation.staging / "metadata.json", {"name": name, "version": reservation.version})
    return publish(reservation)


def _reserve_and_die(model_dir: Path, name: str) -> None:
    reserve_version(model_dir, name)
    os.kill(os.getpid(), signal.SIGKILL)


def reserve_in_a_killed_process(model_dir: Path, name: str = "cats") -> Path:
    """Reserve a version the way a training run does, in a process that is then SIGKILLed; its staging folder."""
    child = multiprocessing.get_context("fork").Process(target=_reserve_and_die, args=(model_dir, name))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    return max((model_dir / name).glob(".v*.partial"), key=lambda p: p.name)


def age(folder: Path, hours: float) -> None:
    """Make a staging folder and what it holds look untouched for `hours`."""
    then = time.time() - hours * 3600
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (then, then))


def tree(root: Path) -> dict[str, Any]:
    """Everything visible under a registry folder: file bytes and link targets."""
    return {
        str(p.relative_to(root)): os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def actions(checks: list[ReservationCheck]) -> dict[str, str]:
    return {check.reservation.staging.name: check.action for check in checks}


def test_dead_owner_is_removed_and_live_owner_is_kept(tmp_path):
    dead = reserve_in_a_killed_process(tmp_path)
    live = reserve_version(tmp_path, "cats")
    owner = json.loads((live.staging / OWNER_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["host"]
    age(live.staging, 1000)  # however old: a live owner's reservation is never removed

    outcomes = collect_garbage(tmp_path)
    assert actions(outcomes) == {dead.name: "removed", live.staging.name: "kept"}
    reasons = {check.reservation.staging.name: check.reason for check in outcomes}
    assert "is gone" in reasons[dead.name]
    assert "still running" in reasons[live.staging.name]
    assert not dead.exists()
    assert live.staging.is_dir()


def test_dry_run_removes_nothing(tmp_path):
    dead = reserve_in_a_killed_process(tmp_path)
    before = tree(tmp_path)
    assert actions(collect_garbage(tmp_path, dry_run=True)) == {dead.name: "would remove"}
    assert tree(tmp_path) == before


def test_published_versions_and_latest_are_untouched(tmp_path):
    publish_new(tmp_path)
    publish_new(tmp_path)
    published = {k: v for k, v in tree(tmp_path).items() if k.startswith(("cats/v", "cats/latest"))}
    assert not any(OWNER_FILE in k for k in published)  # the owner record is not part of a version
    reserve_in_a_killed_process(tmp_path)
    assert [check.action for check in collect_garbage(tmp_path)] == ["removed"]
    assert {k: v for k, v in tree(tmp_path).items() if k.startswith(("cats/v", "cats/latest"))} == published
    assert os.readlink(tmp_path / "cats" / "latest") == "v002"


def test_numbers_are_not_reused_after_gc(tmp_path):
    publish_new(tmp_path)
    assert reserve_in_a_killed_process(tmp_path).name == ".v002.partial"
    assert reserve_in_a_killed_process(tmp_path).name == ".v003.partial"
    assert len(collect_garbage(tmp_path)) == 2
    assert reserve_version(tmp_path, "cats").version == 4
    assert publish_new(tmp_path).name == "v005"


def test_interrupted_gc_leftovers_are_removed(tmp_path):
    (tmp_path / "cats" / ".v002.gc").mkdir(parents=True)  # gc killed between its claim and its delete
    assert reserve_version(tmp_path, "cats").version == 3
    assert actions(collect_garbage(tmp_path)) == {".v002.gc": "removed", ".v003.partial": "kept"}


def owner_edit(staging: Path, **changes: Any) -> None:
    owner = json.loads((staging / OWNER_FILE).read_text())
    write_json(staging / OWNER_FILE, {**owner, **changes})


@pytest.mark.parametrize(
    ("change", "hours", "abandoned", "reason"),
    [
        ({"start": "0"}, 0, True, "now belongs to another process"),  # our pid, but another process's start
        ({"host": "elsewhere"}, 25, True, "host elsewhere"),
        ({"host": "elsewhere"}, 23, False, "untouched for only"),
        ({"boot_id": "another-boot"}, 23, False, "another host"),  # a pid from another boot says nothing here
        (None, 25, True, "no owner record"),
        (None, 1, False, "no owner record"),
    ],
    ids=["pid-reused", "other-host-old", "other-host-recent", "other-boot-recent", "unknown-old", "unknown-recent"],
)
def test_owners_that_cannot_be_asked_wait_for_the_age_limit(tmp_path, change, hours, abandoned, reason):
    staging = reserve_version(tmp_path, "cats").staging
    if change is None:
        (staging / OWNER_FILE).unlink()  # a reservation made before owners were recorded
    else:
        owner_edit(staging, **change)
    age(staging, hours)
    [check] = check_reservations(tmp_path, older_than_hours=24)
    assert (check.abandoned, check.reservation.version) == (abandoned, 1)
    assert reason in check.reason
    assert actions(collect_garbage(tmp_path)) == {staging.name: "removed" if abandoned else "kept"}
    assert staging.exists() is not abandoned


def test_a_long_run_on_another_host_keeps_its_number_while_it_reports_in(tmp_path):
    reservation = reserve_version(tmp_path, "cats")
    owner_edit(reservation.staging, host="elsewhere")  # gc can only judge it by age
    age(reservation.staging, 25)
    keep_alive(reservation)  # what training does at the end of every epoch
    [check] = check_reservations(tmp_path, older_than_hours=24)
    assert not check.abandoned and "untouched for only 0.0 h" in check.reason
    assert actions(collect_garbage(tmp_path)) == {reservation.staging.name: "kept"}


def test_a_failed_publish_stays_held_by_its_owner(tmp_path, monkeypatch):
    reservation = reserve_version(tmp_path, "cats")
    write_json(reservation.staging / "metadata.json", {})

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", no_space)
    with pytest.raises(RegistryError):
        publish(reservation)
    monkeypatch.undo()
    [check] = check_reservations(tmp_path)
    assert not check.abandoned and "still running" in check.reason


def test_list_counts_abandoned_reservations_and_suggests_gc(tmp_path, capsys):
    publish_new(tmp_path)
    reserve_in_a_killed_process(tmp_path)
    reserve_version(tmp_path, "cats")
    assert retrain_cli(["registry", "--model-dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "1 abandoned reservation " in out
    assert "retrain registry gc" in out
    assert retrain_cli(["registry", "--model-dir", str(tmp_path), "list", "cats"]) == 0
    assert "1 abandoned reservation " in capsys.readouterr().out
    collect_garbage(tmp_path)
    assert retrain_cli(["registry", "--model-dir", str(tmp_path), "list"]) == 0
    assert "abandoned" not in capsys.readouterr().out


def test_gc_cli_prints_one_line_per_reservation(tmp_path, capsys):
    publish_new(tmp_path)
    dead = reserve_in_a_killed_process(tmp_path)
    live = reserve_version(tmp_path, "cats")  # held by this (live) test process
    args = ["--model-dir", str(tmp_path), "gc"]

    assert retrain_cli(["registry", *args, "--dry-run"]) == 0
    assert dead.is_dir()
    dry = capsys.readouterr().out
    # The one subprocess run: it must see this test process as alive and the killed one as gone.
    command = [*RETRAIN, "registry", *args, "--older-than-hours", "0"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    for out, action in ((dry, "would remove"), (done.stdout, "removed")):
        lines = out.splitlines()
        assert lines[0].startswith(f"{action:<12} cats/.v002.partial: owner pid ") and "is gone" in lines[0]
        assert lines[1].startswith("kept         cats/.v003.partial: ") and "still running" in lines[1]
        assert lines[2] == f"2 reservations: 1 {action}, 1 kept."
    assert not dead.exists() and live.staging.is_dir()
    assert (tmp_path / "cats" / "v001" / "metadata.json").is_file()

"""Registry numbering, concurrent writers, latest, failed publishes and lookups with helpful errors."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest

from retrain.artifacts.registry import (
    abandon,
    held,
    list_versions,
    publish,
    reserve_version,
    resolve,
)
from retrain.errors import RegistryError
from retrain.utils.io import write_json


def publish_new(model_dir: Path, name: str = "cats", **metadata: object) -> Path:
    reservation = reserve_version(model_dir, name)
    metadata = {"name": name, "version": reservation.version, **metadata}
    write_json(reservation.staging / "metadata.json", metadata)
    return publish(reservation)


def latest_target(model_dir: Path, name: str = "cats") -> str:
    return os.readlink(model_dir / name / "latest")


def test_versions_count_up_and_latest_follows(tmp_path):
    first = reserve_version(tmp_path, "cats")
    assert first.version == 1
    assert first.staging == tmp_path / "cats" / ".v001.partial"
    assert first.staging.is_dir()
    (first.staging / "weights.pth").write_bytes(b"w")
    write_json(first.staging / "metadata.json", {})
    assert publish(first) == tmp_path / "cats" / "v001"
    assert (tmp_path / "cats" / "v001" / "weights.pth").read_bytes() == b"w"
    assert not first.staging.exists()
    assert latest_target(tmp_path) == "v001"
    assert publish_new(tmp_path) == tmp_path / "cats" / "v002"
    assert latest_target(tmp_path) == "v002"
    assert (tmp_path / "cats" / "latest" / "metadata.json").is_file()  # usable as a path, too


def test_resolve_accepts_every_reference_form(tmp_path):
    publish_new(tmp_path)
    publish_new(tmp_path)
    v1, v2 = tmp_path / "cats" / "v001", tmp_path / "cats" / "v002"
    assert resolve(tmp_path, "cats@v1") == v1
    assert resolve(tmp_path, "cats@v001") == v1
    assert resolve(tmp_path, "cats@1") == v1
    assert resolve(tmp_path, "cats@latest") == v2
    assert resolve(tmp_path, "cats") == v2


def test_held_number_is_skipped_and_abandon_frees_its_folder(tmp_path):
    held = reserve_version(tmp_path, "cats")
    assert publish_new(tmp_path).name == "v002"
    abandon(held)
    assert not held.staging.exists()
    assert [row["version"] for row in list_versions(tmp_path)] == [2]
    assert publish_new(tmp_path).name == "v003"


def test_the_number_of_a_failed_run_is_never_handed_out_again(tmp_path):
    failed = reserve_version(tmp_path, "cats")  # v001: its run's checkpoints are named cats-v001-...
    abandon(failed)
    assert publish_new(tmp_path).name == "v002"


def test_older_version_published_late_does_not_move_latest_back(tmp_path):
    older = reserve_version(tmp_path, "cats")
    newer = reserve_version(tmp_path, "cats")
    for reservation in (newer, older):
        write_json(reservation.staging / "metadata.json", {})
        publish(reservation)
    assert latest_target(tmp_path) == "v002"
    assert resolve(tmp_path, "cats@1").is_dir()


def _reserve(model_dir: str, barrier, count: int) -> list[int]:
    barrier.wait()
    return [reserve_version(Path(model_dir), "cats").version for _ in range(count)]


def _reserve_and_publish(model_dir: str, barrier, count: int) -> list[int]:
    barrier.wait()
    return [int(publish_new(Path(model_dir)).name[1:]) for _ in range(count)]


@pytest.mark.parametrize("work", [_reserve, _reserve_and_publish])
def test_concurrent_writers_never_share_a_number(tmp_path, work):
    workers, each = 8, 10
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager, context.Pool(workers) as pool:
        barrier = manager.Barrier(workers)
        results = pool.starmap(work, [(str(tmp_path), barrier, each)] * workers)
    numbers = sorted(n for result in results for n in result)
    assert numbers == list(range(1, workers * each + 1))
    if work is _reserve_and_publish:
        assert latest_target(tmp_path) == f"v{workers * each:03d}"


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        ("rename", OSError(28, "No space left on device"), r"No space left.*unchanged"),  # moving into place
        ("replace", PermissionError(13, "Permission denied"), r"latest.*unchanged"),  # moving latest: rolled back
    ],
    ids=["move-fails", "latest-update-fails"],
)
def test_failed_publish_leaves_earlier_versions_and_latest(tmp_path, monkeypatch, call, error, match):
    publish_new(tmp_path)
    reservation = reserve_version(tmp_path, "cats")
    write_json(reservation.staging / "metadata.json", {})

    real = getattr(os, call)

    def fail(src, dst):
        if Path(dst).name not in ("v002", "latest"):  # metadata.json's own atomic write still works
            return real(src, dst)
        raise error

    monkeypatch.setattr(os, call, fail)
    with pytest.raises(RegistryError, match=match):
        publish(reservation)
    monkeypatch.undo()
    assert latest_target(tmp_path) == "v001"
    assert not (tmp_path / "cats" / "v002").exists()
    assert resolve(tmp_path, "cats@latest") == tmp_path / "cats" / "v001"
    assert reservation.staging.is_dir()  # kept for a retry
    assert publish(reservation) == tmp_path / "cats" / "v002"
    assert latest_target(tmp_path) == "v002"


def test_publish_without_metadata_is_refused(tmp_path):
    reservation = reserve_version(tmp_path, "cats")
    with pytest.raises(RegistryError, match=r"no metadata\.json"):
        publish(reservation)
    assert not (tmp_path / "cats" / "v001").exists()


def test_unknown_name_lists_known_names(tmp_path):
    publish_new(tmp_path, "cats")
    publish_new(tmp_path, "dogs")
    with pytest.raises(RegistryError, match=r"No model named 'birds'.*known names: cats, dogs"):
        resolve(tmp_path, "birds@latest")


def test_unknown_version_lists_known_versions(tmp_path):
    publish_new(tmp_path)
    publish_new(tmp_path)
    with pytest.raises(RegistryError, match=r"no version 7.*v001, v002"):
        resolve(tmp_path, "cats@v7")
    with pytest.raises(RegistryError, match=r"unknown version part 'best'"):
        resolve(tmp_path, "cats@best")


def test_empty_registry_says_so(tmp_path):
    with pytest.raises(RegistryError, match="none yet"):
        resolve(tmp_path / "models", "cats@latest")


@pytest.mark.parametrize("name", ["../escape", "a b", "", ".hidden", "a/b"])
def test_names_that_are_not_safe_folder_names(tmp_path, name):
    with pytest.raises(RegistryError, match="cannot be used"):
        reserve_version(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_model_dir_that_is_a_file(tmp_path):
    (tmp_path / "models").write_text("not a folder")
    with pytest.raises(RegistryError, match="Cannot write the model registry") as info:
        reserve_version(tmp_path / "models", "cats")
    assert str(tmp_path / "models") in str(info.value)


def test_model_name_folder_that_is_a_file(tmp_path):
    (tmp_path / "cats").write_text("oops")
    with pytest.raises(RegistryError, match=str(tmp_path / "cats")):
        reserve_version(tmp_path, "cats")


def test_missing_latest_link_falls_back_to_the_newest(tmp_path):
    publish_new(tmp_path)
    publish_new(tmp_path)
    (tmp_path / "cats" / "latest").unlink()  # e.g. copied by a tool that drops symlinks
    assert resolve(tmp_path, "cats@latest").name == "v002"
    assert [row["latest"] for row in list_versions(tmp_path)] == [False, True]


def test_list_versions_rows(tmp_path):
    publish_new(tmp_path, "cats", created="2025-01-01T00:00:00+00:00", metrics={"val/acc": 0.5})
    publish_new(
        tmp_path,
        "cats",
        created="2025-01-02T00:00:00+00:00",
        metrics={"val/acc": 0.75, "test/acc": 0.7},
        parent={"source": "cats@latest", "name": "cats", "version": 1},
    )
    imagenet = {"source": "IMAGENET1K_V1", "name": "ResNet18_Weights.IMAGENET1K_V1"}
    publish_new(tmp_path, "dogs", parent=imagenet)
    (tmp_path / "dogs" / "v001" / "metadata.json").write_text("{broken")
    rows = list_versions(tmp_path)
    assert [(r["name"], r["version"], r["latest"]) for r in rows] == [
        ("cats", 1, False),
        ("cats", 2, True),
        ("dogs", 1, True),
    ]
    assert rows[1]["metrics"] == {"val/acc": 0.75, "test/acc": 0.7}
    assert rows[1]["created"] == "2025-01-02T00:00:00+00:00"
    assert rows[1]["parent"] == "cats@v001"
    assert rows[0]["parent"] is None and rows[0]["problem"] is None
    assert "not valid JSON" in rows[2]["problem"]
    assert [r["version"] for r in list_versions(tmp_path, "cats")] == [1, 2]
    assert list_versions(tmp_path / "nothing-here") == []


def latest_made_a_real_folder(model_dir: Path, name: str = "cats") -> Path:
    """What `cp -aL` leaves: latest is a copy of the version it pointed to, not a link."""
    latest = model_dir / name / "latest"
    target = latest.resolve()
    latest.unlink()
    shutil.copytree(target, latest)
    return latest


def test_latest_as_a_real_folder_is_refused_when_the_run_starts(tmp_path):
    publish_new(tmp_path)
    latest = latest_made_a_real_folder(tmp_path)
    with pytest.raises(RegistryError) as info:
        reserve_version(tmp_path, "cats")
    message = str(info.value)
    assert f"{latest} is a real folder, not the link" in message and "Fix: check that it holds" in message
    assert f"rm -r {latest}" in message
    assert sorted(p.name for p in (tmp_path / "cats").iterdir()) == [".latest.lock", "latest", "v001"]
    shutil.rmtree(latest)  # the fix the message gives
    assert publish_new(tmp_path).name == "v002" and latest_target(tmp_path) == "v002"


def test_latest_turned_into_a_folder_during_a_run_fails_the_publish_cleanly(tmp_path):
    publish_new(tmp_path)
    reservation = reserve_version(tmp_path, "cats")
    write_json(reservation.staging / "metadata.json", {})
    latest_made_a_real_folder(tmp_path)
    with pytest.raises(RegistryError, match=r"is a real folder, not the link"):
        publish(reservation)
    assert not (tmp_path / "cats" / ".latest.tmp").exists() and not (tmp_path / "cats" / "v002").exists()
    assert reservation.staging.is_dir()  # kept for a retry once latest is fixed


@pytest.mark.parametrize("stop", [RuntimeError("injected"), KeyboardInterrupt(), SystemExit(1)])
def test_a_held_reservation_is_dropped_when_the_run_fails_or_is_stopped(tmp_path, stop):
    with pytest.raises(type(stop)), held(reserve_version(tmp_path, "cats")) as reservation:
        (reservation.staging / "weights.pth").write_bytes(b"half")
        raise stop
    assert list((tmp_path / "cats").glob(".*.partial")) == []
    assert publish_new(tmp_path).name == "v002"  # its number is still never handed out again


def test_a_held_reservation_that_was_published_stays(tmp_path):
    with held(reserve_version(tmp_path, "cats")) as reservation:
        write_json(reservation.staging / "metadata.json", {})
        publish(reservation)
    assert [row["version"] for row in list_versions(tmp_path)] == [1]


def test_a_new_class_set_is_announced_naming_both_sets(tmp_path, caplog):
    publish_new(tmp_path, class_names=["cat", "dog"])
    with caplog.at_level(logging.WARNING):
        publish_new(tmp_path, class_names=["cat", "dog"])
        assert caplog.text == ""
        publish_new(tmp_path, class_names=["cat", "dog", "fox"])
    assert "cats@v003 has a new class set: [cat, dog, fox] (3 classes) instead of cats@v002's [cat, dog]" in caplog.text
    assert "added [fox]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        publish_new(tmp_path, class_names=["dog", "cat", "fox"])
    assert "the same names in another order" in caplog.text


def test_list_rows_carry_classes_and_the_monitored_value(tmp_path):
    results = {"monitor": "val/acc", "monitor_value": 0.875, "best_epoch": 2, "test": {}}
    publish_new(tmp_path, class_names=["cat", "dog", "fox", "owl"], results=results)
    (row,) = list_versions(tmp_path)
    assert row["classes"] == ["cat", "dog", "fox", "owl"]
    assert (row["monitor"], row["monitor_value"]) == ("val/acc", 0.875)

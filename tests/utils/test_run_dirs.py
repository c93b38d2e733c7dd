"""`ckpt_path=last` resolves to the newest run's own last.ckpt, and says so when that file or folder is gone instead
of going on with an older run as if it were the one asked for."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from retrain.errors import ConfigError
from retrain.utils.run_dirs import CONTINUED_NOTE, newest_last_checkpoint

NAME = "resnet18"


def run_folder(runs: Path, stamp: str, *files: str, age_s: float = 0) -> Path:
    """A run folder under `runs` holding `files` under checkpoints/, all last changed `age_s` seconds ago."""
    folder = runs / stamp
    for name in files:
        (folder / "checkpoints" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "checkpoints" / name).write_bytes(b"x")
    then = time.time() - age_s
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (then, then))
    return folder


def test_the_newest_last_ckpt_is_resumed(tmp_path: Path) -> None:
    run_folder(tmp_path, "2026-12-01_10-00-00", "last.ckpt", age_s=3600)
    newer = run_folder(tmp_path, "2026-12-02_10-00-00", "last.ckpt", age_s=60)
    assert newest_last_checkpoint(tmp_path, NAME) == newer / "checkpoints" / "last.ckpt"


def test_the_newest_runs_last_ckpt_deleted_is_an_error_naming_what_is_left(tmp_path: Path) -> None:
    older = run_folder(tmp_path, "2026-12-01_10-00-00", "last.ckpt", age_s=3600)
    newer = run_folder(tmp_path, "2026-12-02_10-00-00", "last.ckpt", "resnet18-v002-epoch003.ckpt", age_s=60)
    (newer / "checkpoints" / "last.ckpt").unlink()  # was: silently went on with the older run, in its folder
    with pytest.raises(ConfigError) as info:
        newest_last_checkpoint(tmp_path, NAME)
    message = str(info.value)
    assert f"the newest run, {newer}, has no checkpoints/last.ckpt" in message
    assert f"ckpt_path={newer / 'checkpoints' / 'resnet18-v002-epoch003.ckpt'}" in message
    assert f"ckpt_path={older / 'checkpoints' / 'last.ckpt'} goes on with the older run" in message
    assert "Fix:" in message


def test_a_last_ckpt_that_links_to_a_file_gone_is_an_error_not_a_crash(tmp_path: Path) -> None:
    newer = run_folder(tmp_path, "2026-12-02_10-00-00", "resnet18-v002-epoch003.ckpt", age_s=60)
    (newer / "checkpoints" / "last.ckpt").symlink_to(tmp_path / "moved-away.ckpt")  # was: FileNotFoundError traceback
    with pytest.raises(ConfigError, match=r"has no checkpoints/last.ckpt .*epoch003.ckpt goes on from"):
        newest_last_checkpoint(tmp_path, NAME)


def test_the_folder_a_session_went_on_in_deleted_is_an_error(tmp_path: Path) -> None:
    older = run_folder(tmp_path, "2026-12-01_10-00-00", "last.ckpt", age_s=3600)
    session = tmp_path / "2026-12-03_10-00-00"
    session.mkdir()
    (session / CONTINUED_NOTE).write_text(f"{tmp_path / '2026-12-02_10-00-00'}\n")  # that run folder was removed
    with pytest.raises(ConfigError, match=r"went on in .*2026-12-02_10-00-00 \(continued_in.txt\), which no longer"):
        newest_last_checkpoint(tmp_path, NAME)
    assert older.is_dir()


@pytest.mark.parametrize("note", [None, b"", b"\xff\xfe\x00binary", b"not a path\n", b"/two\n/lines\n"])
def test_a_continued_in_note_that_is_missing_or_garbage_changes_nothing(tmp_path: Path, note: bytes | None) -> None:
    run = run_folder(tmp_path, "2026-12-01_10-00-00", "last.ckpt", age_s=3600)
    session = tmp_path / "2026-12-03_10-00-00"
    session.mkdir()
    if note is not None:
        (session / CONTINUED_NOTE).write_bytes(note)  # only a note for people: resuming never reads it
    assert newest_last_checkpoint(tmp_path, NAME) == run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("results", [None, '{"status": "preempted", "checkpoint": null}', "{not json"])
def test_a_newer_run_killed_before_its_first_checkpoint_is_an_error_not_a_resume_of_the_older(
    tmp_path: Path, results: str | None
) -> None:
    older = run_folder(tmp_path, "2026-12-01_10-00-00", "last.ckpt", age_s=3600)
    killed = tmp_path / "2026-12-02_10-00-00"  # as a SIGKILL during epoch 0 leaves it: no checkpoints/ folder
    (killed / ".hydra").mkdir(parents=True)
    (killed / "split.json").write_text("{}")
    if results is not None:  # none: SIGKILL; a SIGTERM before the first save writes "preempted"
        (killed / "results.json").write_text(results)
    with pytest.raises(ConfigError) as info:
        newest_last_checkpoint(tmp_path, NAME)  # was: went on with the older run, in its folder, as if asked for
    message = str(info.value)
    assert f"the newest run, {killed}, saved no checkpoint" in message
    assert f"ckpt_path={older / 'checkpoints' / 'last.ckpt'} goes on with the older run" in message
    assert "leaving ckpt_path out starts a new run" in message and "put the missing file" not in message


def test_newer_folders_of_runs_that_never_started_or_ended_well_or_are_older_do_not_block(tmp_path: Path) -> None:
    typo = tmp_path / "2026-12-03_10-00-00"  # failed on its config (a wrong data.root): no split.json
    (typo / ".hydra").mkdir(parents=True)
    unsaved = tmp_path / "2026-12-04_10-00-00"  # callbacks=none: ran to its end, saved no checkpoint
    unsaved.mkdir()
    (unsaved / "split.json").write_text("{}")
    (unsaved / "results.json").write_text('{"status": "ok"}')
    earlier = tmp_path / "2026-11-30_10-00-00"  # killed early, but before the other run last saved
    earlier.mkdir()
    (earlier / "split.json").write_text("{}")
    then = time.time() - 7200
    os.utime(earlier / "split.json", (then, then))
    run = run_folder(tmp_path, "2026-12-01_10-00-00", "last.ckpt", age_s=3600)
    assert newest_last_checkpoint(tmp_path, NAME) == run / "checkpoints" / "last.ckpt"

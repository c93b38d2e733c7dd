"""Resuming when things went wrong: a damaged or missing last.ckpt, a requeued job's folder that lost its checkpoint
or holds a garbled results.json, and signals that arrive while a run is already stopping.

Each ends in one paragraph with the fix (exit 1) or in a stop with a clear exit code and the checkpoint whole, never
a traceback, a fresh start reported as a resume, or a cut-short checkpoint write. In-process, 32 px images.
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from clitools import FAST, composed, make_imagefolder

import retrain.artifacts.formats as formats
import retrain.tasks.common as common
import retrain.tasks.train as train_task
from retrain.callbacks.preemption import INTERRUPTED_EXIT_CODE
from retrain.errors import ConfigError
from retrain.tasks.resume import resolve_resume
from retrain.tasks.train import train
from retrain.utils.hydra import run_task

SETTINGS = (
    *FAST,
    "trainer.max_epochs=2",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "test=false",
    "save.publish=false",
    "~callbacks.report",
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 8 train images each: 3 batches of 8 an epoch."""
    return make_imagefolder(tmp_path_factory.mktemp("hostile") / "images", per_class=8)


def last_ckpt(run_dir: Path) -> Path:
    """A small Lightning checkpoint at `run_dir`/checkpoints/last.ckpt, as a stopped run leaves it."""
    path = run_dir / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {"model.fc.weight": torch.ones(3, 512)}, "epoch": 1, "global_step": 4}, path)
    return path


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_a_weight(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[data.index(torch.ones(8).numpy().tobytes())] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (truncate, "truncated or corrupt"),
        (edit_a_weight, "was changed after it was written"),  # was: loaded, a weight silently different
        (Path.unlink, "has no checkpoints/last.ckpt"),  # was: resumed the older run, in its folder
    ],
    ids=["truncated", "edited", "deleted"],
)
def test_ckpt_path_last_with_a_damaged_or_deleted_last_ckpt_is_one_paragraph_with_the_fix(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str], damage: Any, said: str
) -> None:
    runs = tmp_path / "logs" / "train" / "runs" / "resnet18"
    last_ckpt(runs / "2026-12-01_10-00-00")  # an older run of the same name
    newest = last_ckpt(runs / "2026-12-02_10-00-00")
    damage(newest)
    cfg = composed(tmp_path, f"data.root={folder}", *SETTINGS, f"paths.log_dir={tmp_path / 'logs'}", "ckpt_path=last")
    with pytest.raises(SystemExit) as stopped:
        run_task(train, cfg)
    assert stopped.value.code == 1
    error = capsys.readouterr().err
    assert said in error and str(newest.parent.parent) in error and "Fix:" in error
    assert "Traceback" not in error


def test_a_requeued_job_whose_results_json_is_garbled_resumes_from_its_last_ckpt(
    tmp_path: Path, folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = composed(tmp_path, f"data.root={folder}", *SETTINGS)
    own = last_ckpt(tmp_path / "run")  # the job's own folder, as a requeued job finds it
    (tmp_path / "run" / "results.json").write_bytes(b'{"status": "preem\xff')  # was: a JSONDecodeError traceback
    with caplog.at_level(logging.WARNING, logger="retrain"):
        assert resolve_resume(cfg) == own
    assert "results.json could not be read" in caplog.text


def test_a_requeued_job_whose_last_ckpt_is_gone_does_not_start_over_on_top_of_its_run(
    tmp_path: Path, folder: Path
) -> None:
    cfg = composed(tmp_path, f"data.root={folder}", *SETTINGS)
    own = tmp_path / "run" / "checkpoints" / "last.ckpt"
    (tmp_path / "run" / "results.json").write_text(json.dumps({"status": "preempted", "checkpoint": str(own)}))
    with pytest.raises(ConfigError, match=r"says the run stopped \(preempted\) and saved .*which is gone.*Fix:"):
        resolve_resume(cfg)  # was: a fresh start in the same folder, over the stopped run's files


class Signals(L.Callback):
    """Raises `signals` in this process after optimizer step `step`, as a terminal or a scheduler would."""

    def __init__(self, step: int, *signals: int) -> None:
        self.step = step
        self.signals = signals
        self.sent = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Send them once, at `step`."""
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            for signum in self.signals:
                signal.raise_signal(signum)


def stopped_run(where: Path, folder: Path, monkeypatch: pytest.MonkeyPatch, sender: Signals, *overrides: str) -> int:
    """Train in `where` with `sender` among the callbacks; the exit code it stopped with."""
    make_callbacks = common.make_callbacks
    monkeypatch.setattr(train_task, "make_callbacks", lambda cfg: [*make_callbacks(cfg), sender])
    cfg = composed(where, f"data.root={folder}", *SETTINGS, *overrides)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        run_task(train, cfg)
    assert signal.getsignal(signal.SIGINT) is before  # pytest's own Ctrl-C works again
    return int(stopped.value.code)


class CtrlCTwiceInTest(L.Callback):
    """Presses Ctrl-C twice while the post-fit test's first batch runs."""

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        """Both in batch 0."""
        if batch_idx == 0:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize(("phase", "saved_at"), [("fit", 3), ("test", 6)])
def test_a_second_ctrl_c_mid_step_stops_at_once_with_130_and_the_command_to_resume(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch, phase: str, saved_at: int
) -> None:
    # The first Ctrl-C waits for the step to end; the second, before it does, stops at once: was exit 1 (Lightning's)
    # with no results.json and no resume command.
    if phase == "test":
        make_tester = train_task.single_device_trainer

        def tester_pressed_twice(trainer_cfg: Any) -> L.Trainer:
            """The post-fit tester, with Ctrl-C pressed twice in its first batch."""
            tester = make_tester(trainer_cfg)
            tester.callbacks.append(CtrlCTwiceInTest())
            return tester

        monkeypatch.setattr(train_task, "single_device_trainer", tester_pressed_twice)
    sender = Signals(4, signal.SIGINT, signal.SIGINT) if phase == "fit" else Signals(-1)
    assert stopped_run(tmp_path, folder, monkeypatch, sender, f"test={phase == 'test'}") == 130
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert (results["status"], results["phase"], results["checkpoint"]) == ("interrupted", phase, str(last))
    assert results["resume_command"].endswith("ckpt_path=last")
    assert torch.load(last, weights_only=True)["global_step"] == saved_at  # fit: epoch 0's end, step 4 was cut short


def test_ctrl_c_during_a_requeue_stop_ends_it_as_interrupted_and_never_cuts_its_checkpoint_short(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requeued: list[int] = []

    def submitit_requeue(signum: int, frame: Any) -> None:
        """What submitit installs for its signal: requeue the job, then exit."""
        requeued.append(signum)
        raise SystemExit(3)

    sender = Signals(4, signal.SIGUSR2, signal.SIGINT)  # the requeue signal, then Ctrl-C before the step ends
    hold = formats._hold_if_requested

    def ctrl_c_mid_write() -> None:
        """Between the complete temp file and its rename: once the stop has begun, Ctrl-C again."""
        hold()
        if sender.sent:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(formats, "_hold_if_requested", ctrl_c_mid_write)
    previous = signal.signal(signal.SIGUSR2, submitit_requeue)
    try:
        code = stopped_run(tmp_path, folder, monkeypatch, sender)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    # Was: the write cut short (last.ckpt of step 3), exit 130 with no results.json, or exit 1 with none.
    assert code == INTERRUPTED_EXIT_CODE and requeued == []  # the person at the terminal asked to stop
    checkpoints = tmp_path / "run" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not list(checkpoints.glob(".*.tmp"))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "interrupted"

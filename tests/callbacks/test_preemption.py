"""SIGTERM from fit to publish: noted instead of fatal, kept under a Trainer's own handler, and a stop that says how
to finish.

The CLI runs (SIGTERM in fit, SIGTERM in the post-fit test, then the resume that publishes) are in
tests/e2e/test_kill_cli.py. These check the pieces in-process: `signal.raise_signal` delivers SIGTERM to this
thread and runs the Python handler before it returns, so nothing depends on timing.
"""

from __future__ import annotations

import doctest
import json
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import SIGTERMException

import retrain.callbacks.preemption as preemption_module
from retrain.artifacts.registry import reserve_version
from retrain.callbacks.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, Preemption, PreemptionCheckpoint


@pytest.fixture
def escaped() -> Iterator[list[int]]:
    """The SIGTERMs that got past Preemption: a handler of the test's own counts them instead of ending pytest."""
    caught: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    yield caught
    signal.signal(signal.SIGTERM, previous)


def cpu_trainer(**kwargs: Any) -> L.Trainer:
    """A quiet one-device CPU Trainer."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


class TermAtFirstBatch(L.Callback):
    """Sends this process SIGTERM while the first training or test batch runs."""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """SIGTERM in batch 0 only."""
        self.on_test_batch_start(trainer, pl_module, batch, batch_idx)

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        """SIGTERM in batch 0 only."""
        if batch_idx == 0:
            signal.raise_signal(signal.SIGTERM)


def test_doctests() -> None:
    assert doctest.testmod(preemption_module).failed == 0


def test_sigterm_between_trainer_runs_is_noted_and_the_handler_is_put_back(escaped: list[int], tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with Preemption(cpu_trainer(), tmp_path, "m", [], None) as preemption:
        assert not preemption.received
        signal.raise_signal(signal.SIGTERM)  # e.g. while publishing: the process goes on
        assert preemption.received
    assert escaped == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_trainer_run_inside_keeps_the_note_and_its_loop_stops(escaped: list[int], tmp_path: Path) -> None:
    # What the design relies on: a Trainer chains the handler it finds after its own and restores it at teardown.
    with Preemption(cpu_trainer(), tmp_path, "m", [], None) as preemption:
        tester = cpu_trainer(callbacks=[TermAtFirstBatch()], limit_test_batches=3)
        with pytest.raises(SIGTERMException):  # a SystemExit: unhandled, exit code 0
            tester.test(BoringModel(), verbose=False)
        assert preemption.received
        assert signal.getsignal(signal.SIGTERM) == preemption._note
    assert escaped == []


def test_stop_abandons_the_version_records_the_phase_and_exits_143(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reservation = reserve_version(tmp_path / "models", "m")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    last = run_dir / "checkpoints" / "last.ckpt"
    overrides = ["data.root=/d", "name=old", "~callbacks.report"]
    preemption = Preemption(cpu_trainer(), run_dir, "m", overrides, reservation)
    preemption.stop_if_received("publish", last)  # no SIGTERM: goes on
    preemption.received = True
    with caplog.at_level(logging.WARNING, logger="retrain"), pytest.raises(SystemExit) as stop:
        preemption.stop_if_received("publish", last)
    assert stop.value.code == PREEMPTED_EXIT_CODE == 143
    assert not reservation.staging.exists()
    command = "python train.py data.root=/d '~callbacks.report' name=m ckpt_path=last"
    assert json.loads((run_dir / "results.json").read_text()) == {
        "status": "preempted",
        "phase": "publish",
        "checkpoint": str(last),
        "resume_command": command,
        "epoch": 0,
        "global_step": 0,
    }
    assert "Stopped on SIGTERM in publish" in caplog.text and command in caplog.text


def test_ctrl_c_takes_the_sigterm_path_and_a_second_one_stops_at_once(escaped: list[int], tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGINT)
    with Preemption(cpu_trainer(), tmp_path, "m", [], None) as preemption:
        signal.raise_signal(signal.SIGINT)  # the first: noted, the run goes on to the next step boundary
        assert preemption.received and preemption.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        with pytest.raises(SystemExit) as stop:
            preemption.stop("fit", tmp_path / "last.ckpt")
    assert stop.value.code == INTERRUPTED_EXIT_CODE == 130
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) is before and escaped == []


@pytest.mark.parametrize("smoke_test", [False, True])
def test_sigterm_in_a_smoke_test_saves_no_last_ckpt(
    smoke_test: bool, escaped: list[int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A smoke test's last.ckpt would be what `ckpt_path=last` resumes, instead of the real run checked before it.
    saver = PreemptionCheckpoint(dirpath=str(tmp_path / "checkpoints"))
    limits: dict[str, Any] = {"fast_dev_run": True} if smoke_test else {"max_epochs": 1, "limit_train_batches": 2}
    with Preemption(cpu_trainer(), tmp_path, "m", [], None) as preemption:
        trainer = cpu_trainer(callbacks=[saver, TermAtFirstBatch()], limit_val_batches=0, **limits)
        with pytest.raises(SIGTERMException):
            trainer.fit(BoringModel())
        preemption.trainer = trainer
        with caplog.at_level(logging.WARNING, logger="retrain"), pytest.raises(SystemExit):
            preemption.stop("fit", saver.saved_path)
    assert saver.path.exists() is not smoke_test and (saver.saved_path is None) is smoke_test
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["resume_command"] is None) is smoke_test
    assert ("run the smoke test again" in caplog.text) is smoke_test
    assert escaped == []

"""Preemption: on SIGTERM (what schedulers send before they kill a job), keep what is resumable and stop with 143.

Lightning 2.x turns SIGTERM into a clean stop only inside its loops: while a Trainer runs, its signal connector
sets ``trainer.received_sigterm``, the loops raise ``SIGTERMException`` at the next batch boundary, and every
callback's ``on_exception`` runs before the Trainer tears down. It saves nothing; ``PreemptionCheckpoint`` does,
through the Trainer's checkpoint IO (atomic in this project), under the name ``ckpt_path=last`` looks for.

Outside its loops Lightning does not help: between Trainer runs SIGTERM has its default action (the process
dies at once: no results.json, no hint, the reserved version left behind), and ``SIGTERMException`` is a
``SystemExit`` without a code: raised by the test Trainer after fit, it would end the process with exit 0 and
nothing published. ``Preemption`` covers the whole span from fit to publish (see its docstring), and treats Ctrl-C
(SIGINT) the same way, exiting 130: a KeyboardInterrupt would stop the run wherever it is, and Lightning then exits 1.

Under submitit (``hydra/launcher=slurm``, ``submitit_local``) the job's time is nearly up when its requeue signal
arrives (USR2, or $SUBMITIT_PREEMPT_SIGNAL). submitit's own handler requeues the job and exits at once, wherever
training is; ``Preemption`` takes that signal like SIGTERM instead, and hands it to submitit's handler once
last.ckpt is saved. The requeued job runs in the same folder and resumes from it (`tasks/resume.resolve_resume`).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import lightning as L
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException

from retrain.artifacts import registry
from retrain.utils.io import write_json

log = logging.getLogger("retrain")

# What a shell reports for a process ended by SIGTERM (128 + 15): the run stopped early, on purpose.
PREEMPTED_EXIT_CODE = 143
# And by Ctrl-C (128 + 2), as `retrain` (cli/main.py) exits on one.
INTERRUPTED_EXIT_CODE = 130


def requeue_signal() -> int:
    """The signal submitit sends a job shortly before its time limit, and requeues it on (USR2 unless set)."""
    return int(getattr(signal, f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')}", signal.SIGUSR2))


class PreemptionCheckpoint(L.Callback):
    """Saves ``<dirpath>/<filename>.ckpt`` when training stops on SIGTERM or Ctrl-C, so ``ckpt_path=last`` resumes.

    The checkpoint is taken after the batch that was running when the signal came, so at most that batch's
    time is lost; resuming continues the same epoch.

    >>> cb = PreemptionCheckpoint(dirpath="runs/x/checkpoints")
    >>> cb.path.as_posix(), cb.saved_path
    ('runs/x/checkpoints/last.ckpt', None)
    """

    def __init__(self, dirpath: str, filename: str = "last") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.saved_path: Path | None = None
        self._noted: bool | None = None  # under DDP: whether this rank got a stop signal (None: not taken over)

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Under DDP, note stop signals instead of Lightning (see `_take_over_sigterm`)."""
        self._take_over_sigterm(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Under DDP, note stop signals instead of Lightning (see `_take_over_sigterm`)."""
        self._take_over_sigterm(trainer)

    def _take_over_sigterm(self, trainer: L.Trainer) -> None:
        # Under DDP, Lightning's SIGTERM handler broadcasts from inside the handler (Lightning #20825): that
        # collective lands among whatever the ranks run at that moment (a checkpoint callback's broadcast, the
        # gradient all-reduce) and gloo aborts on the mismatch; and each rank stops on its own flag, so a rank that
        # sees the signal a step later deadlocks the others (#20806). Here the handler only notes the signal; after
        # every step the ranks agree (`on_train_batch_end`) and all stop at the same one, whichever rank got it.
        taken = self._noted is not None
        if trainer.world_size < 2 or taken or threading.current_thread() is not threading.main_thread():
            return
        # The handler Lightning found and calls after its own (Preemption's): called here in turn.
        chained: Any = trainer._signal_connector._original_handlers.get(signal.SIGTERM)

        def note(signum: int, frame: FrameType | None) -> None:
            self._noted = True
            if callable(chained):
                chained(signum, frame)

        self._noted = False
        signal.signal(signal.SIGTERM, note)  # Lightning's teardown puts back the handler it found

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Under DDP, stop every rank after this step if any rank got a stop signal."""
        if self._noted is not None and trainer.strategy.reduce_boolean_decision(self._noted, all=False):
            trainer._signal_connector.received_sigterm = True  # Lightning's loops raise SIGTERMException on it

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Let the next fit take the signal over again."""
        self._noted = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Save the checkpoint if the exception is Lightning's stop on SIGTERM (any other error saves nothing).

        A smoke test (`trainer.fast_dev_run`) saves none: `ckpt_path=last` would resume its one-batch model.
        """
        if isinstance(exception, SIGTERMException) and not getattr(trainer, "fast_dev_run", False):
            trainer.save_checkpoint(self.path, weights_only=False)  # every rank calls it; rank 0 writes
            self.saved_path = self.path


def preemption_checkpoint(callbacks: Iterable[L.Callback]) -> Path | None:
    """The file a PreemptionCheckpoint saved when fit stopped on SIGTERM (None: none saved, or no such callback)."""
    return next((cb.saved_path for cb in callbacks if isinstance(cb, PreemptionCheckpoint) and cb.saved_path), None)


def resume_command(name: str, checkpoint: Path, overrides: Sequence[str]) -> str:
    """The command that finishes a stopped run: its own overrides, with `name` and `ckpt_path` set to resume it.

    >>> resume_command("cats", Path("runs/x/checkpoints/last.ckpt"), ["data.root=/d", "name=old", "~callbacks.report"])
    "python train.py data.root=/d '~callbacks.report' name=cats ckpt_path=last"
    """
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in ("name", "ckpt_path")]
    # `last` finds the newest last.ckpt of this name: this run's, or the one it resumed from. Others go by path.
    ckpt = "last" if checkpoint.name == "last.ckpt" else str(checkpoint)
    script = sys.argv[0] if sys.argv[0].endswith("train.py") else "train.py"  # as the user typed it
    return shlex.join(["python", script, *kept, f"name={name}", f"ckpt_path={ckpt}"])


class Preemption:
    """From fit to publish, a SIGTERM or Ctrl-C stops the run at the next step boundary: exit 143 (130 for Ctrl-C)
    and a way to finish it.

    While inside, SIGTERM only sets `received` (and Lightning's own flag while a Trainer runs: a Trainer chains the
    handler it finds after its own and puts it back at teardown, so this one stays in place the whole time). The
    run then stops in one of three places, each with results.json ``"status": "preempted"``, the cut-off ``phase``,
    the reserved registry version abandoned, and the command that finishes the run:

    - fit: Lightning's loops raise ``SIGTERMException`` between batches and ``PreemptionCheckpoint`` saves
      last.ckpt (`stop`);
    - test: just before it starts (`stop_if_received`), or between its batches (its loop raises
      ``SIGTERMException``). A SIGTERM in the milliseconds while the test Trainer sets up, before Lightning's
      handler is in, lets the test run to its end and stops the run before publish;
    - publish: just before it starts (`stop_if_received`). Publishing itself is not cut short: it takes about a
      second and is all or nothing, so a SIGTERM during it lets it finish, and exit 0 means published.

    last.ckpt is written at the end of every epoch, so after fit the rerun (``ckpt_path=last``) skips training and
    goes straight to test and publish. Installing the handler needs the main thread; elsewhere it is left alone.

    Ctrl-C (SIGINT) calls the SIGTERM handler in place, so it takes the same path (results.json ``"status":
    "interrupted"``, exit 130). So does a scheduler's requeue signal when a handler for it is installed
    (submitit's): the same stop, then that handler, which requeues the job. A Ctrl-C after a SIGTERM or a requeue
    signal makes the coming stop an interrupted one (no requeue: the person at the terminal asked to stop). A
    second Ctrl-C stops at once, mid-step, as a plain KeyboardInterrupt (`forced`: the run ends as interrupted, from
    the checkpoint saved before), unless the stop has begun: last.ckpt is then being written, and cutting that
    short would lose it.
    """

    def __init__(
        self,
        trainer: L.Trainer,
        run_dir: Path,
        name: str,
        overrides: Sequence[str],
        reservation: registry.Reservation | None,
    ) -> None:
        self.trainer = trainer
        self.run_dir = run_dir
        self.name = name
        self.overrides = list(overrides)
        self.reservation = reservation
        self.received = False
        self.signal: int | None = None  # the first stop signal: SIGTERM or SIGINT
        self.forced = False  # a second Ctrl-C stopped the run mid-step (Lightning then exits 1; `stop` says 130)
        self._stopping = False  # `stop` has begun
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._note)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
            if callable(signal.getsignal(requeue_signal())):  # submitit's: requeue the job, then exit
                self._previous[requeue_signal()] = signal.signal(requeue_signal(), self._requeue)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():  # None: not set from Python; the default is the safe guess
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = True
        self.signal = self.signal or signum

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping or self.trainer.state.status == TrainerStatus.INTERRUPTED:  # last.ckpt is being written
            log.warning("Ctrl-C: already stopping; last.ckpt and results.json are being written, a moment")
            return
        if self.signal == signal.SIGINT:
            self.forced = True
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signal.SIGINT
        log.warning("Ctrl-C: stopping after the current step, saving last.ckpt (Ctrl-C again stops at once)")
        handler = signal.getsignal(signal.SIGTERM)  # while a Trainer runs, Lightning's: it calls _note in turn
        (handler if callable(handler) else self._note)(signal.SIGTERM, frame)

    def _requeue(self, signum: int, frame: FrameType | None) -> None:
        if self.received:
            return  # already stopping
        self.signal = signum
        log.warning("Requeue signal: stopping after the current step, saving last.ckpt, then requeuing the job")
        handler = signal.getsignal(signal.SIGTERM)  # while a Trainer runs, Lightning's: it calls _note in turn
        (handler if callable(handler) else self._note)(signal.SIGTERM, frame)

    def stop_if_received(self, phase: str, checkpoint: Path | None) -> None:
        """Stop before `phase` starts if a SIGTERM came since fit began (one Lightning's loops did not act on)."""
        if self.received:
            self.stop(phase, checkpoint)

    def stop(self, phase: str, checkpoint: Path | None) -> NoReturn:
        """Abandon the reserved version, record the stop in results.json, log how to finish, exit 143 (130)."""
        self._stopping = True
        if self.reservation is not None:
            registry.abandon(self.reservation)
        trainer = self.trainer
        interrupted = self.signal == signal.SIGINT
        if trainer.is_global_zero:
            command = resume_command(self.name, checkpoint, self.overrides) if checkpoint else None
            results: dict[str, Any] = {
                "status": "interrupted" if interrupted else "preempted",
                "phase": phase,
                "checkpoint": str(checkpoint) if checkpoint else None,
                "resume_command": command,
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
            }
            write_json(self.run_dir / "results.json", results)
            if command:
                how = f"resume from {checkpoint} with: {command}"
            elif getattr(trainer, "fast_dev_run", False):
                how = "run the smoke test again (trainer.fast_dev_run saves no checkpoint: there is nothing to resume)"
            else:
                how = "start again: no checkpoint was saved (no PreemptionCheckpoint, and checkpoint.save_last=false)"
            stopped_on = "Ctrl-C" if interrupted else signal.Signals(self.signal or signal.SIGTERM).name
            if self.forced:  # mid-step, so no checkpoint of this step: the steps after the one named are lost
                stopped_on = "a second Ctrl-C, at once (the steps after the checkpoint below are trained again)"
            log.warning(
                "Stopped on %s in %s at epoch %d, step %d; nothing was published. To finish, %s",
                stopped_on,
                phase,
                trainer.current_epoch,
                trainer.global_step,
                how,
            )
        requeue = self._previous.get(requeue_signal())
        if self.signal == requeue_signal() and callable(requeue):
            requeue(requeue_signal(), None)  # submitit: requeue this job (same folder: it resumes), then exit
        raise SystemExit(INTERRUPTED_EXIT_CODE if interrupted else PREEMPTED_EXIT_CODE)

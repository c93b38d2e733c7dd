"""Preemption: on SIGTERM (what schedulers send before they kill a job), save a resumable last.ckpt and stop.

Lightning 2.x already turns SIGTERM into a clean stop: its signal connector sets ``trainer.received_sigterm``,
the loops raise ``SIGTERMException`` at the next batch boundary, and every callback's ``on_exception`` runs
before the Trainer tears down. What it does not do is save anything; this callback does, through the
Trainer's checkpoint IO (atomic in this project), under the name ``ckpt_path=last`` looks for.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from retrain.artifacts.metadata import write_json

log = logging.getLogger("retrain")

# What a shell reports for a process ended by SIGTERM (128 + 15): the run stopped early, on purpose.
PREEMPTED_EXIT_CODE = 143


class PreemptionCheckpoint(L.Callback):
    """Saves ``<dirpath>/<filename>.ckpt`` when training stops on SIGTERM, so ``ckpt_path=last`` resumes there.

    The checkpoint is taken after the batch that was running when the signal came, so at most that batch's
    time is lost; resuming continues the same epoch.

    >>> cb = PreemptionCheckpoint(dirpath="runs/x/checkpoints")
    >>> cb.path.as_posix(), cb.saved_path
    ('runs/x/checkpoints/last.ckpt', None)
    """

    def __init__(self, dirpath: str, filename: str = "last") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.saved_path: Path | None = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Save the checkpoint if the exception is Lightning's stop on SIGTERM (any other error saves nothing)."""
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path, weights_only=False)  # every rank calls it; rank 0 writes
            self.saved_path = self.path


def exit_preempted(trainer: L.Trainer, callbacks: Iterable[L.Callback], run_dir: Path, name: str) -> NoReturn:
    """After a SIGTERM stop: record it in results.json, say how to resume, exit with PREEMPTED_EXIT_CODE."""
    saved = next((cb.saved_path for cb in callbacks if isinstance(cb, PreemptionCheckpoint) and cb.saved_path), None)
    if trainer.is_global_zero:
        results: dict[str, Any] = {
            "status": "preempted",
            "checkpoint": str(saved) if saved else None,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
        }
        write_json(run_dir / "results.json", results)
        if saved:
            how = f"saved {saved}; resume with the same command plus name={name} ckpt_path=last"
        else:
            how = "no checkpoint was saved (the callbacks have no PreemptionCheckpoint); the last epoch's is kept"
        log.warning(
            "Stopped on SIGTERM at epoch %d, step %d: %s. Nothing was published.",
            trainer.current_epoch,
            trainer.global_step,
            how,
        )
    raise SystemExit(PREEMPTED_EXIT_CODE)

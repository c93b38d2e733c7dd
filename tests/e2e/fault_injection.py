"""Test-only callbacks that e2e tests add through the config: `+callbacks.fail._target_=fault_injection.RaiseOnRank`.

The subprocess finds this module because the test puts tests/e2e on its PYTHONPATH.
"""

from __future__ import annotations

import os
import signal as signal_module
import time
from pathlib import Path
from typing import Any

import lightning as L


class RaiseOnRank(L.Callback):
    """Raise in one DDP rank at the start of a training batch, after noting the time in `stamp`.

    The other ranks are then waiting for this one in the gradient all-reduce: a hang unless failures spread.
    """

    def __init__(self, rank: int, stamp: str, batch: int = 0) -> None:
        self.rank = rank
        self.stamp = Path(stamp)
        self.batch = batch

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Fail on the chosen rank and batch."""
        if trainer.global_rank == self.rank and batch_idx == self.batch:
            self.stamp.write_text(str(time.time()))
            raise RuntimeError(f"injected failure on rank {self.rank} at batch {batch_idx}")


class SignalOnce(L.Callback):
    """Send this process `signal` (a name: USR2, TERM) after optimizer step `step`, once across restarts of the job:
    `marker` is created the first time. As a scheduler does shortly before a job's time limit. Under DDP, `rank`
    picks the one process that gets it (as `kill <pid>` of the launching process does); None: the first to get there.
    """

    def __init__(self, step: int, signal: str, marker: str, rank: int | None = None) -> None:
        self.step = step
        self.signal = signal
        self.marker = Path(marker)
        self.rank = rank

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Signal at `step` unless an earlier start of the job did."""
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), getattr(signal_module, f"SIG{self.signal}"))

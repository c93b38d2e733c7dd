"""Test-only callbacks that e2e tests add through the config: `+callbacks.fail._target_=fault_injection.RaiseOnRank`.

The subprocess finds this module because the test puts tests/e2e on its PYTHONPATH.
"""

from __future__ import annotations

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

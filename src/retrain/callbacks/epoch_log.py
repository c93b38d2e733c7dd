"""One plain line of metrics per epoch, for logs that no terminal reads: SLURM job files, CI output, `| tee`.

A Rich progress bar written to a file wraps into many lines per epoch and says nothing until the epoch ends.
This callback logs one greppable line per epoch instead, through the `retrain` logger, so it also lands in the
run's `train.log`; with a progress bar on screen (a terminal) the line goes to `train.log` only.

Example (a line as it appears in train.log, after Hydra's `[time][logger][level] - ` prefix):

>>> format_epoch_line(3, 9, {"train/loss": 0.412, "val/acc": 0.88, "train/acc": 0.871}, lr=1.2e-3, seconds=12.4)
'epoch 3/9  train/loss 0.4120  train/acc 0.8710  val/acc 0.8800  lr 1.20e-03  12.4s'
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from retrain.model.module import epoch_row
from retrain.utils.console import log_to_run_log_only

log = logging.getLogger(__name__)
_SPLITS = ("train/", "val/")


def _order(key: str) -> tuple[int, int, str]:
    """train before val; within each, loss, then acc, then the rest by name."""
    split = next(i for i, prefix in enumerate(_SPLITS) if key.startswith(prefix))
    name = key[len(_SPLITS[split]) :]
    return split, {"loss": 0, "acc": 1}.get(name, 2), name


def format_epoch_line(
    epoch: int, last_epoch: int | None, metrics: Mapping[str, float], *, lr: float | None, seconds: float
) -> str:
    """`epoch 3/9  train/loss 0.4120 ...  lr 1.20e-03  12.4s`: Lightning's 0-based epoch, as in checkpoint names."""
    parts = [f"epoch {epoch}" + (f"/{last_epoch}" if last_epoch is not None else "")]
    parts += [f"{key} {value:.4f}" for key, value in sorted(metrics.items(), key=lambda item: _order(item[0]))]
    if lr is not None:
        parts.append(f"lr {lr:.2e}")
    parts.append(f"{seconds:.1f}s")
    return "  ".join(parts)


def head_lr(trainer: L.Trainer) -> float | None:
    """The learning rate of the head's parameter group (`fc`, which gets `model.lr` itself), else the first group's."""
    if not trainer.optimizers:
        return None
    groups = trainer.optimizers[0].param_groups
    group = next((g for g in groups if g.get("name") == "fc"), groups[0])
    return float(group["lr"])


class EpochLog(L.Callback):
    """Log one line of metrics per epoch, and a progress line every `progress_every_s` of a long epoch.

    The epoch line is written when the epoch's train and val metrics are final (train epoch end, after
    validation), so the last epoch's line comes before the end-of-run report. Progress lines appear only when no
    progress bar is on screen (stdout is not a terminal, or `trainer.enable_progress_bar=false`). Rank zero only.
    """

    def __init__(self, progress_every_s: float | None = 30.0) -> None:
        self.progress_every_s = progress_every_s
        self._epoch_start = 0.0
        self._last_line = 0.0
        self._lr: float | None = None

    @rank_zero_only
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the epoch's clock and note its learning rate (the LR monitor logs it at the same moment)."""
        self._epoch_start = self._last_line = time.monotonic()
        self._lr = head_lr(trainer)

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """A progress line when the epoch has been silent for `progress_every_s` and no bar shows progress."""
        self._progress(trainer, "batch", batch_idx + 1, trainer.num_training_batches)

    @rank_zero_only
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """The same for a long validation inside fit."""
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._progress(trainer, "val batch", batch_idx + 1, sum(trainer.num_val_batches))

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the epoch's line: its train and val metrics, the learning rate and how long it took."""
        max_epochs = trainer.max_epochs
        last = max_epochs - 1 if max_epochs is not None and max_epochs > 0 else None
        line = format_epoch_line(
            trainer.current_epoch,
            last,
            _metrics(trainer),
            lr=self._lr,
            seconds=time.monotonic() - self._epoch_start,
        )
        self._emit(trainer, line)

    def _progress(self, trainer: L.Trainer, what: str, done: int, total: float) -> None:
        if not self.progress_every_s or trainer.progress_bar_callback is not None:
            return
        now = time.monotonic()
        if now - self._last_line < self.progress_every_s:
            return
        self._last_line = now
        of = f"/{int(total)} ({100 * done / total:.0f}%)" if math.isfinite(total) and total > 0 else ""
        log.info("epoch %d  %s %d%s  %.0fs", trainer.current_epoch, what, done, of, now - self._epoch_start)

    @staticmethod
    def _emit(trainer: L.Trainer, line: str) -> None:
        if trainer.progress_bar_callback is None:
            log.info(line)  # the terminal (or job log) and train.log
        else:
            log_to_run_log_only(log, line)  # the bar already shows the epoch on screen


def _metrics(trainer: L.Trainer) -> dict[str, float]:
    """This epoch's train/ and val/ values, the same row the module's history (and results.json) records."""
    row = epoch_row(trainer.current_epoch, trainer.callback_metrics, validated=True)
    row.pop("epoch")
    return row

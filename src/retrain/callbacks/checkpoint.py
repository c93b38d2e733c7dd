"""Versioned, atomic checkpointing: every file name says which model version, when, which epoch and how good."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from retrain.artifacts.formats import atomic_torch_save, reporting_disk_full, tensor_bytes
from retrain.errors import ConfigError, DiskFullError

log = logging.getLogger("retrain")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temp file and renames it into place, so a kill never leaves half a file.

    A disk that fills up meanwhile is reported as one paragraph (DiskFullError), and the older files stay intact.
    Inside `keeping_failures`, a write that fails for a reason of the disk is kept in a list instead of raised.
    """

    def __init__(self) -> None:
        super().__init__()
        self._failures: list[Exception] | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Save `checkpoint` to `path` atomically (temp file, fsync, os.replace)."""
        path = Path(path)
        intact = (
            f"Every checkpoint already in {path.parent} is intact: {path.name} was written to a temporary file, "
            "which was removed."
        )
        then = "resume with ckpt_path=last (the newest last.ckpt of this run name)"
        try:
            with reporting_disk_full(
                path.parent, tensor_bytes(checkpoint), f"the checkpoint {path.name}", intact, then
            ):
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_torch_save(checkpoint, path)
        except (OSError, RuntimeError, DiskFullError) as error:
            if self._failures is None or not _from_the_disk(error):
                raise
            self._failures.append(error)

    @contextlib.contextmanager
    def keeping_failures(self) -> Iterator[list[Exception]]:
        """Within: writes that fail for a reason of the disk are listed instead of raised (the rolling last.ckpt)."""
        self._failures = []
        try:
            yield self._failures
        finally:
            self._failures = None


def _from_the_disk(error: BaseException | None) -> bool:
    """Whether a failed write came from the file system: a full disk, or any OSError (torch wraps it)."""
    while error is not None:
        if isinstance(error, (OSError, DiskFullError)):
            return True
        error = error.__cause__ or error.__context__
    return False


def saved_epoch(path: str | Path) -> int | None:
    """The epoch a Lightning checkpoint was saved in (as its file name says), read without loading its tensors."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except (OSError, KeyError, RuntimeError):  # not there, or not a Lightning checkpoint
        return None


class VersionedCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose file names carry the model name, registry version, date, epoch and metric.

    Example file name: ``resnet18-v003-20261127-epoch007-val_acc0.9512.ckpt``. The version is reserved by rank 0
    before training (``stamp``) and broadcast to the other ranks in ``setup``, so every rank agrees on the paths.

    With ``save_last``, ``every_n_steps`` and ``every_n_minutes`` also rewrite last.ckpt inside an epoch (a
    rolling checkpoint, atomic like every other): it carries the loader's position, so ``ckpt_path=last`` resumes
    at the next batch after a crash that left no time for the SIGTERM checkpoint. The last batch of an epoch is
    left to the end-of-epoch save that follows it.

    >>> cb = VersionedCheckpoint(monitor="val/acc", mode="max")
    >>> cb.stamp("resnet18", 3, dt.date(2026, 11, 27))
    >>> cb.filename
    'resnet18-v003-20261127-epoch{epoch:03d}-val_acc{val/acc:.4f}'
    """

    def __init__(
        self, *args: Any, every_n_steps: int | None = None, every_n_minutes: float | None = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("auto_insert_metric_name", False)
        # A run that goes on in its own folder rewrites its last.ckpt (and any same-named file), never `last-v1.ckpt`.
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)
        for key, value in (("every_n_steps", every_n_steps), ("every_n_minutes", every_n_minutes)):
            if value is not None and not value > 0:
                raise ConfigError(
                    f"callbacks.checkpoint.{key}={value}: expected a positive number, or null for no rolling "
                    f"last.ckpt inside an epoch. Fix: e.g. callbacks.checkpoint.{key}="
                    f"{'500' if key == 'every_n_steps' else '30'}, or callbacks.checkpoint.{key}=null."
                )
        self.every_n_steps = every_n_steps
        self.every_n_minutes = every_n_minutes
        self._rolled_at = time.monotonic()  # when last.ckpt was last rewritten inside an epoch (or fit started)
        self._roll_failing = False  # the last rolling save failed (warned once until one succeeds)
        self._stamp: tuple[str, int, str] | None = None

    def stamp(self, name: str, version: int, date: dt.date | None = None) -> None:
        """Set the name and version that go into every file name (rank 0, before `fit`)."""
        day = (date or dt.datetime.now(dt.timezone.utc).date()).strftime("%Y%m%d")
        self._stamp = (name, version, day)
        self._apply_stamp()

    def _apply_stamp(self) -> None:
        assert self._stamp is not None
        name, version, day = self._stamp
        metric = ""
        if self.monitor:
            metric = f"-{self.monitor.replace('/', '_')}{{{self.monitor}:.4f}}"
        self.filename = f"{name}-v{version:03d}-{day}-epoch{{epoch:03d}}{metric}"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the clock of `every_n_minutes` with the fit."""
        super().on_train_start(trainer, pl_module)
        self._rolled_at = time.monotonic()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Save as Lightning does, then rewrite last.ckpt if `every_n_steps` or `every_n_minutes` says so."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._rolling_save_due(trainer):
            self._roll(trainer)
            self._rolled_at = time.monotonic()

    def _roll(self, trainer: L.Trainer) -> None:
        # A rolling save that fails (disk full, or any OSError) lets the run go on, with a warning. The save only
        # insures against a crash; training is unharmed. Stopping would lose every step since the last good save
        # for certain, while going on loses them only if the process also dies before the disk has room again:
        # the next rolling save retries, and the end-of-epoch save, which the run cannot do without, still stops
        # it with the DiskFullError. The write is atomic: the last.ckpt already there stays whole. Failures are
        # caught inside the write (rank 0's), so every rank still meets at Lightning's barrier after it.
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, AtomicCheckpointIO):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        with io.keeping_failures() as failed:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if failed and not self._roll_failing:
            cause = str(failed[0]).split(". ", 1)[0].splitlines()[0]  # DiskFullError's first sentence, or the OSError
            log.warning(
                "The rolling last.ckpt was not written at step %d (%s); the last.ckpt already in %s is intact and "
                "training goes on: the next rolling save tries again. Fix: make room there before the epoch ends, "
                "as the end-of-epoch checkpoint stops the run if it cannot be written.",
                trainer.global_step,
                cause,
                self.dirpath,
            )
        elif self._roll_failing and not failed:
            log.info("The rolling last.ckpt was written again at step %d", trainer.global_step)
        self._roll_failing = bool(failed)

    def _rolling_save_due(self, trainer: L.Trainer) -> bool:
        if not self.save_last or (self.every_n_steps is None and self.every_n_minutes is None):
            return False
        if self._should_skip_saving_checkpoint(trainer) or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return False
        due = self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0
        if self.every_n_minutes is not None:
            due = due or time.monotonic() - self._rolled_at >= 60 * self.every_n_minutes
            due = bool(trainer.strategy.broadcast(due, src=0))  # clocks differ across ranks; every rank must save
        return due

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save as Lightning does, then make sure last.ckpt is this epoch's (see `_refresh_last`)."""
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer, at_train_epoch_end=True)
        self._rolled_at = time.monotonic()  # last.ckpt is at most one epoch old: `every_n_minutes` counts from here

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save as Lightning does, then make sure last.ckpt is this epoch's (see `_refresh_last`)."""
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer, at_train_epoch_end=False)

    def _refresh_last(self, trainer: L.Trainer, *, at_train_epoch_end: bool) -> None:
        # Lightning rewrites last.ckpt only when a top-k file was written in the same step, so after a tie in the
        # monitored metric `ckpt_path=last` would resume from an older epoch.
        if not self.save_last or self._should_skip_saving_checkpoint(trainer):
            return
        if self._last_global_step_saved == trainer.global_step and self._last_checkpoint_saved == self.last_model_path:
            return  # Lightning has just written last.ckpt at this step (with a top-k file): a second write adds nothing
        if self._should_save_on_train_epoch_end(trainer) == at_train_epoch_end:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """As Lightning, except that a smoke test (`trainer.fast_dev_run`) writes no last.ckpt here either.

        Lightning skips every other save under fast_dev_run but this one, which made the smoke test's one-step model
        the newest last.ckpt: `ckpt_path=last` then went on from it instead of the real run checked before.
        """
        if not getattr(trainer, "fast_dev_run", False):  # set at run time, not declared on Trainer
            super().on_train_end(trainer, pl_module)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Share rank 0's stamp with every rank before any path is computed."""
        super().setup(trainer, pl_module, stage)
        self._stamp = trainer.strategy.broadcast(self._stamp, src=0)
        if self._stamp is not None:
            self._apply_stamp()

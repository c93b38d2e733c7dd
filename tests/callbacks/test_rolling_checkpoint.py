"""callbacks.checkpoint.every_n_steps / every_n_minutes: last.ckpt rewritten inside an epoch, atomically."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from clitools import quiet_trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from retrain.callbacks.checkpoint import AtomicCheckpointIO, VersionedCheckpoint
from retrain.errors import ConfigError


class LastCheckpointSpy(L.Callback):
    """Notes, as each batch starts, the global step last.ckpt was saved at (None: no file yet)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[int | None] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Read last.ckpt's step."""
        exists = self.path.is_file()
        self.seen.append(torch.load(self.path, weights_only=True)["global_step"] if exists else None)


def fit(tmp_path: Path, **rolling: Any) -> list[int | None]:
    """One epoch of 6 steps with a rolling last.ckpt; what the spy saw, then the final file's step."""
    spy = LastCheckpointSpy(tmp_path / "last.ckpt")
    checkpoint = VersionedCheckpoint(dirpath=tmp_path, monitor=None, save_top_k=0, save_last=True, **rolling)
    trainer = quiet_trainer(
        max_epochs=1,
        limit_train_batches=6,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[spy, checkpoint],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(BoringModel())
    return [*spy.seen, torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"]]


def test_every_n_steps_rewrites_last_ckpt_inside_the_epoch_and_leaves_the_last_batch_to_the_epoch_end(
    tmp_path: Path,
) -> None:
    # Saved after steps 2 and 4; not after 6, the epoch's last, where the end-of-epoch save writes it.
    assert fit(tmp_path, every_n_steps=2) == [None, None, 2, 2, 4, 4, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp files, no last-v1.ckpt


def test_every_n_minutes_rewrites_last_ckpt_once_the_time_has_passed(tmp_path: Path) -> None:
    assert fit(tmp_path, every_n_minutes=1e-9) == [None, 1, 2, 3, 4, 5, 6]  # due after every step


def test_without_either_last_ckpt_is_written_only_at_the_epoch_end(tmp_path: Path) -> None:
    assert fit(tmp_path, every_n_minutes=None) == [None] * 6 + [6]


def test_a_fast_dev_run_smoke_test_writes_no_last_ckpt(tmp_path: Path) -> None:
    # Lightning's on_train_end wrote one, the newest last.ckpt of the name: ckpt_path=last then resumed the smoke
    # test's one-step model instead of the run it was checking.
    checkpoint = VersionedCheckpoint(dirpath=tmp_path, monitor=None, save_top_k=0, save_last=True)
    trainer = L.Trainer(
        fast_dev_run=True, callbacks=[checkpoint], plugins=[AtomicCheckpointIO()], logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(BoringModel())
    assert trainer.global_step == 1 and list(tmp_path.glob("*.ckpt")) == []


@pytest.mark.parametrize("setting", [{"every_n_steps": 0}, {"every_n_minutes": -5}])
def test_a_setting_that_is_not_positive_is_refused_with_the_fix(setting: dict[str, float]) -> None:
    ((key, value),) = setting.items()
    with pytest.raises(ConfigError, match=rf"callbacks.checkpoint.{key}={value}: expected a positive number.*Fix:"):
        VersionedCheckpoint(monitor=None, **setting)


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EIO, "Input/output error")],
    ids=["disk full", "I/O error"],
)
def test_a_rolling_save_that_fails_keeps_the_previous_last_ckpt_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: OSError
) -> None:
    save, calls = torch.save, []

    def failing_second_write(obj: object, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) != 2:  # the rolling saves after steps 2 and 4, then the epoch end's
            return save(obj, f, *args, **kwargs)
        f.write(b"partial bytes")
        raise error

    monkeypatch.setattr(torch, "save", failing_second_write)
    with caplog.at_level("WARNING", logger="retrain"):
        seen = fit(tmp_path, every_n_steps=2)
    assert seen == [None, None, 2, 2, 2, 2, 6]  # step 4's save failed: step 2's file stayed whole until the epoch end
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left behind
    (warning,) = [r.getMessage() for r in caplog.records if "rolling last.ckpt was not written" in r.getMessage()]
    assert "at step 4" in warning and "intact and training goes on" in warning and "Fix:" in warning

"""A disk that fills up during a checkpoint write: one paragraph naming the folder, the bytes and what is intact."""

from __future__ import annotations

import errno

import pytest
import torch

from retrain.callbacks.checkpoint import AtomicCheckpointIO
from retrain.errors import DiskFullError

DISK_FULL = {
    "OSError": OSError(errno.ENOSPC, "No space left on device"),
    "torch RuntimeError": RuntimeError(
        "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3: file write failed"
    ),
}


@pytest.mark.parametrize("error", DISK_FULL.values(), ids=DISK_FULL.keys())
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, error):
    checkpoints = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    previous = {"state_dict": {"w": torch.ones(1000)}, "epoch": 0}
    io.save_checkpoint(previous, checkpoints / "last.ckpt")

    def full(obj: object, f: object, *args: object, **kwargs: object) -> None:
        f.write(b"partial bytes")  # type: ignore[attr-defined]
        raise error

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError) as info:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(250_000)}, "epoch": 1}, checkpoints / "last.ckpt")
    message = str(info.value)
    assert message.startswith(f"The disk filled up while writing the checkpoint last.ckpt in {checkpoints}")
    assert "it needs about 1.0 MB" in message and "free there" in message  # 250k float32 tensors
    assert f"Every checkpoint already in {checkpoints} is intact" in message and "ckpt_path=last" in message
    monkeypatch.undo()
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]  # no temp file left behind
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 0


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(torch, "save", denied)
    with pytest.raises(PermissionError):
        AtomicCheckpointIO().save_checkpoint({"epoch": 1}, tmp_path / "last.ckpt")

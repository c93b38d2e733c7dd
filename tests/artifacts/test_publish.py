"""What a published version holds (weights and metadata, not the optimizer), a full disk while publishing, and the
model a sweep job keeps until the sweep publishes its best one."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from safetensors import safe_open

from retrain.artifacts import publish as publishing
from retrain.artifacts.integrity import verify_version
from retrain.artifacts.registry import list_versions, reserve_version
from retrain.artifacts.sources import load_source
from retrain.errors import DiskFullError
from retrain.utils.io import sha256_file, write_json

RESULTS = {"monitor": "val/acc", "monitor_value": 0.75, "best_epoch": 1, "test": {"test/acc": 0.5}}
DISK_FULL = {
    "OSError": OSError(errno.ENOSPC, "No space left on device"),
    # What torch.save raises when the disk fills while it writes from C++.
    "torch RuntimeError": RuntimeError(
        "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3: file write failed"
    ),
}


def best_checkpoint(folder: Path, model: torch.nn.Module, metadata: dict[str, Any]) -> Path:
    """A Lightning checkpoint as training leaves it: weights under `model.`, SGD momentum, loop state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    checkpoint = {
        "epoch": 1,
        "global_step": 6,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "optimizer_states": [optimizer.state_dict()],
        "loops": {"fit_loop": {}},
        "retrain": metadata,
    }
    path = folder / "resnet18-v001-epoch001.ckpt"
    torch.save(checkpoint, path)
    return path


def test_a_resnet18_version_holds_its_weights_not_the_optimizer(tmp_path, make_metadata):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    metadata = make_metadata("resnet18", 1)
    checkpoint = best_checkpoint(tmp_path, model, metadata)
    reservation = reserve_version(tmp_path / "models", "resnet18")
    published = publishing.publish_version(reservation, model, metadata, checkpoint, RESULTS)

    version = Path(published["path"])
    files = {p.name: p.stat().st_size for p in version.iterdir()}
    assert set(files) == {"weights.pth", "model.safetensors", "metadata.json", "results.json"}
    assert sum(files.values()) <= 100e6  # was 180 MB with model.ckpt's optimizer state
    meta = json.loads((version / "metadata.json").read_text())
    assert meta["checkpoint_path"] == str(checkpoint) and meta["checkpoint_sha256"] == sha256_file(checkpoint)
    assert verify_version(version).problems == ()
    plain = torchvision.models.resnet18(num_classes=3)
    plain.load_state_dict(torch.load(version / "weights.pth", weights_only=True))  # strict: the user's own code
    loaded = load_source("resnet18@v1", model_dir=tmp_path / "models")
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict[key], tensor) and torch.equal(plain.state_dict()[key], tensor), key


@pytest.mark.parametrize("error", DISK_FULL.values(), ids=DISK_FULL.keys())
def test_a_full_disk_while_publishing_is_one_paragraph_and_changes_nothing(
    tmp_path, monkeypatch, small_state, publish_version, error
):
    publish_version(small_state)
    before = sorted(p.name for p in (tmp_path / "models" / "cats").iterdir())
    reservation = reserve_version(tmp_path / "models", "cats")

    def full(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(torch, "save", full)  # weights.pth is the first file written
    model = torch.nn.Linear(4, 3)
    with pytest.raises(DiskFullError) as info:
        publishing.publish_version(reservation, model, {"class_names": ["a", "b", "c"]}, None, RESULTS)
    message = str(info.value)
    assert message.startswith(f"The disk filled up while writing the registry version cats@v002 in {tmp_path}")
    assert "needs about 0.0 MB" in message and " is free there." in message
    assert "earlier versions of cats and its latest link are unchanged" in message and "Fix: free" in message
    assert sorted(p.name for p in (tmp_path / "models" / "cats").iterdir()) == sorted([*before, ".high_water"])
    assert [row["version"] for row in list_versions(tmp_path / "models")] == [1]


def test_a_sweep_job_keeps_its_model_and_the_sweep_publishes_it_as_the_next_version(
    tmp_path, small_state, make_metadata, publish_version
):
    publish_version(small_state)  # cats@v001 exists: the kept model becomes v002
    run_dir = tmp_path / "sweep" / "1"
    model = torch.nn.Linear(4, 3)
    metadata = make_metadata("cats", 0)  # a sweep job reserves no number
    write_json(run_dir / "results.json", {**RESULTS, "status": "ok"})
    kept = publishing.keep_for_sweep(
        run_dir, model, metadata, None, RESULTS, model_dir=tmp_path / "models", name="cats"
    )
    assert publishing.has_kept(run_dir) and (kept / "model.safetensors").is_file()
    assert list_versions(tmp_path / "models", "cats")[-1]["version"] == 1  # nothing published yet

    published = publishing.publish_kept(run_dir)
    version = Path(published["path"])
    assert (published["name"], published["version"], version.name) == ("cats", 2, "v002")
    assert json.loads((run_dir / "results.json").read_text())["registry"] == published
    assert not publishing.has_kept(run_dir) and not kept.exists()
    meta = json.loads((version / "metadata.json").read_text())
    with safe_open(version / "model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["retrain"])["version"] == meta["version"] == 2
    assert meta["metrics"]["test/acc"] == 0.5 and meta["results"]["monitor_value"] == 0.75
    assert verify_version(version).problems == ()
    loaded = load_source("cats@latest", model_dir=tmp_path / "models")
    assert torch.equal(loaded.state_dict["weight"], model.weight.detach())

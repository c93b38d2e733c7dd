"""Each weights format round-trips, lands on the CPU with torchvision keys, and writes are atomic."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open

from retrain.artifacts.formats import (
    HOLD_ENV,
    atomic_torch_save,
    read_artifact,
    save_full_model,
    save_safetensors,
    save_weights_pth,
)
from retrain.utils.io import sha256_file


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)  # safetensors stores keys sorted
    for key, value in expected.items():
        assert actual[key].device.type == "cpu"
        assert torch.equal(actual[key], value), key


def test_weights_pth_loads_strict_into_torchvision_resnet18(tmp_path, resnet_state):
    path = tmp_path / "weights.pth"
    save_weights_pth(resnet_state, path)
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(torch.load(path))  # strict, and torch's default weights_only=True
    assert_same(model.state_dict(), resnet_state)


def test_plain_state_dict_round_trips(tmp_path, small_state):
    path = tmp_path / "weights.pth"
    save_weights_pth(small_state, path)
    artifact = read_artifact(path)
    assert artifact.kind == "state_dict"
    assert artifact.metadata is None
    assert artifact.path == path
    assert artifact.sha256 == sha256_file(path)
    assert_same(artifact.state_dict, small_state)


def test_safetensors_round_trips_tensors_and_header_metadata(tmp_path, small_state, make_metadata):
    path = tmp_path / "model.safetensors"
    metadata = make_metadata(config={"optim": {"lr": 1e-3, "betas": [0.9, 0.999]}}, freeze=["stem"])
    save_safetensors(small_state, metadata, path)
    artifact = read_artifact(path)
    assert artifact.kind == "safetensors"
    assert artifact.metadata == metadata
    assert_same(artifact.state_dict, small_state)
    with safe_open(str(path), framework="pt") as f:  # readable by any safetensors tool, as JSON text
        assert json.loads(f.metadata()["retrain"])["class_names"] == ["cat", "dog", "élan"]


def test_safetensors_accepts_non_contiguous_tensors(tmp_path):
    state = {"fc.weight": torch.arange(12.0).reshape(3, 4).t()}
    save_safetensors(state, None, tmp_path / "m.safetensors")
    artifact = read_artifact(tmp_path / "m.safetensors")
    assert artifact.metadata is None
    assert_same(artifact.state_dict, state)


def test_lightning_checkpoint_gives_torchvision_keys_and_our_metadata(tmp_path, small_state, make_metadata):
    metadata = make_metadata()
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in small_state.items()},
        "epoch": 4,
        "global_step": 40,
        "pytorch-lightning_version": "2.6.6",
        "optimizer_states": [],
        "retrain": metadata,
    }
    path = tmp_path / "last.ckpt"
    atomic_torch_save(checkpoint, path)
    artifact = read_artifact(path)
    assert artifact.kind == "lightning"
    assert artifact.metadata == metadata
    assert artifact.checkpoint is not None and artifact.checkpoint["epoch"] == 4
    assert_same(artifact.state_dict, small_state)


def test_lightning_checkpoint_of_compiled_model_drops_module_level_extras(tmp_path, small_state):
    state = {f"model._orig_mod.{k}": v for k, v in small_state.items()}
    state["criterion.weight"] = torch.ones(3)  # a LightningModule buffer, not part of the network
    atomic_torch_save({"state_dict": state, "epoch": 0}, tmp_path / "x.ckpt")
    artifact = read_artifact(tmp_path / "x.ckpt")
    assert artifact.metadata is None
    assert_same(artifact.state_dict, small_state)


@pytest.mark.parametrize("wrapper", ["module.", "_orig_mod.", "module._orig_mod."])
def test_plain_state_dict_loses_unambiguous_wrappers(tmp_path, small_state, wrapper):
    torch.save({wrapper + k: v for k, v in small_state.items()}, tmp_path / "w.pth")
    assert_same(read_artifact(tmp_path / "w.pth").state_dict, small_state)


def test_plain_state_dict_keeps_other_prefixes_for_surgery_to_report(tmp_path, small_state):
    torch.save({"backbone." + k: v for k, v in small_state.items()}, tmp_path / "w.pth")
    assert set(read_artifact(tmp_path / "w.pth").state_dict) == {"backbone." + k for k in small_state}


def test_format_is_detected_by_content_not_suffix(tmp_path, small_state, make_metadata):
    save_safetensors(small_state, make_metadata(), tmp_path / "looks_like.ckpt")
    torch.save(small_state, tmp_path / "looks_like.safetensors")
    assert read_artifact(tmp_path / "looks_like.ckpt").kind == "safetensors"
    assert read_artifact(tmp_path / "looks_like.safetensors").kind == "state_dict"


def test_legacy_torch_save_format_reads(tmp_path, small_state):
    torch.save(small_state, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert_same(read_artifact(tmp_path / "old.pth").state_dict, small_state)


def test_reference_script_checkpoint_unwraps_model_entry(tmp_path, small_state):
    torch.save({"model": small_state, "epoch": 3, "lr": 0.1}, tmp_path / "ref.pth")
    assert_same(read_artifact(tmp_path / "ref.pth").state_dict, small_state)


def test_full_model_reads_only_with_allow_pickle(tmp_path):
    model = torchvision.models.resnet18(num_classes=3)
    path = tmp_path / "full.pt"
    save_full_model(model, path)
    artifact = read_artifact(path, allow_pickle=True)
    assert artifact.kind == "full_model"
    assert_same(artifact.state_dict, model.state_dict())


def _claim_cuda(path: Path) -> None:
    """Rewrite a torch.save zip so its storages say they live on cuda:0."""
    with zipfile.ZipFile(path) as archive:
        records = [(info, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in records:
            if info.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            archive.writestr(info, data)


def test_cuda_saved_file_loads_on_cpu(tmp_path, small_state):
    path = tmp_path / "gpu.pth"
    torch.save(small_state, path)
    _claim_cuda(path)
    if not torch.cuda.is_available():  # proves the file really asks for CUDA
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    assert_same(read_artifact(path).state_dict, small_state)


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"w": torch.zeros(2)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 (whatever pickling raises for a lambda)
        atomic_torch_save({"w": torch.ones(2), "f": lambda: 0}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO to synchronise with the writer")
def test_kill_in_the_middle_of_a_write_keeps_previous_file(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"w": torch.zeros(3)}, path)
    before = path.read_bytes()
    hold = tmp_path / "hold"
    os.mkfifo(f"{hold}.reached")
    # Our end of the FIFO is open before the writer starts, so its open() never blocks; we see EOF
    # once it has opened and closed it, i.e. when the new file is fully written but not yet renamed.
    reached = os.open(f"{hold}.reached", os.O_RDONLY | os.O_NONBLOCK)
    script = "import sys, torch; from retrain.artifacts.formats import atomic_torch_save as s; "
    script += "s({'w': torch.ones(3)}, sys.argv[1])"
    env = {**os.environ, HOLD_ENV: str(hold)}
    writer = subprocess.Popen([sys.executable, "-c", script, str(path)], env=env)
    try:
        ready, _, _ = select.select([reached], [], [], 120)
        assert ready, "the writer never reached the point between writing and renaming"
    finally:
        writer.kill()
        writer.wait()
        os.close(reached)
    assert writer.returncode == -9
    assert path.read_bytes() == before
    assert torch.equal(read_artifact(path).state_dict["w"], torch.zeros(3))
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".last.ckpt.")]
    assert len(leftovers) == 1  # the complete new file was waiting in its temp file
    assert torch.equal(torch.load(leftovers[0])["w"], torch.ones(3))

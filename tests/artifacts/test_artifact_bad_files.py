"""Bad files give one clear ArtifactError, leave the file untouched, and never run code from a pickle."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision

from retrain.artifacts.formats import read_artifact, save_full_model, save_safetensors
from retrain.errors import ArtifactError, UnsafePickleError


def read_fails(path: Path, match: str, **kwargs: bool) -> str:
    """Assert reading fails with ``match`` in a message that names the file and a fix, file unchanged."""
    before = path.read_bytes()
    with pytest.raises(ArtifactError, match=match) as info:
        read_artifact(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    assert "Fix:" in message
    assert path.read_bytes() == before
    return message


def test_missing_file_names_the_path_and_similar_files(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ArtifactError, match="does not exist") as info:
        read_artifact(tmp_path / "modle.ckpt")
    message = str(info.value)
    assert str(tmp_path / "modle.ckpt") in message
    assert "model.ckpt" in message
    assert "notes.txt" not in message


def test_missing_folder_is_said(tmp_path):
    with pytest.raises(ArtifactError, match="neither does its folder"):
        read_artifact(tmp_path / "nowhere" / "last.ckpt")


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(ArtifactError, match="is a folder"):
        read_artifact(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "last.ckpt").touch()
    read_fails(tmp_path / "last.ckpt", "is empty")


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _zip_ckpt(path: Path) -> Path:
    torch.save({"state_dict": {"model.fc.weight": torch.ones(64, 64)}, "epoch": 1}, path)
    return path


def _legacy_pth(path: Path) -> Path:
    torch.save({"fc.weight": torch.ones(64, 64)}, path, _use_new_zipfile_serialization=False)
    return path


def _safetensors(path: Path) -> Path:
    save_safetensors({"fc.weight": torch.ones(64, 64)}, {"name": "x"}, path)
    return path


@pytest.mark.parametrize(
    ("name", "make"),
    [("last.ckpt", _zip_ckpt), ("weights.pth", _legacy_pth), ("model.safetensors", _safetensors)],
)
def test_truncated_files_are_reported_as_damaged(tmp_path, name: str, make: Callable[[Path], Path]):
    message = read_fails(_truncate(make(tmp_path / name)), "truncated or corrupt")
    assert "Traceback" not in message


def _flip(path: Path, at: int) -> Path:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("where", ["a weight", "the pickle"])
def test_a_checkpoint_edited_after_it_was_written_is_refused(tmp_path, where: str):
    path = _zip_ckpt(tmp_path / "last.ckpt")
    data = path.read_bytes()
    # torch.load checks no checksum: a changed weight would load silently, as a model nobody trained.
    at = data.index(torch.ones(1).numpy().tobytes() * 8) if where == "a weight" else data.index(b"state_dict")
    message = read_fails(_flip(path, at), "was changed after it was written")
    assert "CRC-32" in message


def test_a_checkpoint_saved_without_checksums_still_loads(tmp_path):
    from torch.utils.serialization import config

    config.save.compute_crc32 = False  # torch then records CRC 0 for every entry
    try:
        path = _zip_ckpt(tmp_path / "last.ckpt")
    finally:
        config.save.compute_crc32 = True
    assert read_artifact(path).kind == "lightning"


@pytest.mark.parametrize("where", ["a weight", "the metadata"])
def test_a_safetensors_file_edited_after_it_was_written_is_refused(tmp_path, where: str):
    state = torchvision.models.resnet18(num_classes=3).state_dict()
    path = tmp_path / "model.safetensors"
    save_safetensors(state, {"class_names": ["cat", "dog", "eel"]}, path)
    assert read_artifact(path).metadata == {"class_names": ["cat", "dog", "eel"]}
    # safetensors checks no checksum: a changed weight or class name would load as something nobody trained.
    if where == "a weight":
        _flip(path, len(path.read_bytes()) - 1000)
    else:
        data = path.read_bytes()
        end = 8 + int.from_bytes(data[:8], "little")  # the JSON header: still valid after the edit
        path.write_bytes(data[:end].replace(b"eel", b"emu") + data[end:])
    message = read_fails(path, "was changed after it was written")
    assert "SHA-256" in message


def test_a_safetensors_file_from_another_tool_loads_without_a_digest(tmp_path):
    from safetensors.torch import save_file

    state = torchvision.models.resnet18(num_classes=3).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "other.safetensors"))
    assert read_artifact(tmp_path / "other.safetensors").kind == "safetensors"


def test_a_checkpoint_whose_zip_directory_is_damaged_is_reported_not_raised(tmp_path):
    path = _zip_ckpt(tmp_path / "last.ckpt")
    read_fails(_flip(path, len(path.read_bytes()) - 100), "truncated or corrupt")  # was a raw UnicodeDecodeError


def test_safetensors_cut_inside_its_header(tmp_path):
    path = _safetensors(tmp_path / "model.safetensors")
    path.write_bytes(path.read_bytes()[:20])
    read_fails(path, "truncated or corrupt")


def test_random_bytes(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(bytes(range(7, 256)) * 4)
    read_fails(path, "not in any weights format")


def test_random_bytes_after_a_pickle_marker(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"\x80" + bytes(range(256)) * 4)
    read_fails(path, "truncated or corrupt")


def test_json_renamed_ckpt(tmp_path):
    path = tmp_path / "best.ckpt"
    path.write_text(json.dumps({"val/acc": 0.9}))
    read_fails(path, "JSON text file")


def test_dict_without_tensors(tmp_path):
    path = tmp_path / "config.pth"
    torch.save({"lr": 0.1, "epochs": 3}, path)
    message = read_fails(path, "holds no tensors")
    assert "lr" in message


def test_dict_mixing_tensors_and_other_things(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"fc.weight": torch.ones(2), "optimizer": {"lr": 0.1}}, path)
    read_fails(path, "not tensors .*optimizer")


def test_plain_python_pickle(tmp_path):
    path = tmp_path / "config.pkl"
    path.write_bytes(pickle.dumps({"lr": 0.1}, protocol=5))
    read_fails(path, "plain Python pickle")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_export(tmp_path):
    path = tmp_path / "model.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    read_fails(path, "TorchScript")


class Payload:
    """Unpickling this calls open(marker, "w"), i.e. creates a file: code execution we can observe."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _raw_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


def _raw_pickle_protocol2(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=2))


def _torch_zip(path: Path, marker: Path) -> None:
    torch.save({"state_dict": {"fc.weight": torch.ones(1)}, "epoch": 0, "hook": Payload(marker)}, path)


def _torch_legacy(path: Path, marker: Path) -> None:
    torch.save({"fc.weight": Payload(marker)}, path, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize("suffix", [".ckpt", ".pth", ".pt"])
@pytest.mark.parametrize("write", [_raw_pickle, _raw_pickle_protocol2, _torch_zip, _torch_legacy])
def test_pickle_payload_never_runs(tmp_path, suffix: str, write: Callable[[Path, Path], None]):
    marker = tmp_path / "PWNED"
    path = tmp_path / f"evil{suffix}"
    write(path, marker)
    before = path.read_bytes()
    with pytest.raises(UnsafePickleError) as info:
        read_artifact(path)
    message = str(info.value)
    assert not marker.exists()
    assert "open" in message  # names what the file would have called
    assert "model.allow_pickle=true" in message
    assert "execute" in message
    assert path.read_bytes() == before


def test_pickle_payload_is_live_so_the_test_above_can_fail(tmp_path):
    marker = tmp_path / "PWNED"
    _torch_zip(tmp_path / "evil.ckpt", marker)
    with contextlib.suppress(ArtifactError):  # it fails after the payload ran
        read_artifact(tmp_path / "evil.ckpt", allow_pickle=True)
    assert marker.exists()


def test_full_model_needs_allow_pickle(tmp_path):
    path = tmp_path / "model.pt"
    save_full_model(torchvision.models.resnet18(num_classes=2), path)
    message = read_fails(path, "allow_pickle", allow_pickle=False)
    assert "torchvision.models.resnet.ResNet" in message


def test_full_model_whose_class_is_gone(tmp_path, monkeypatch):
    (tmp_path / "user_net.py").write_text("import torch\nclass Net(torch.nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_net

    path = tmp_path / "model.pt"
    save_full_model(user_net.Net(2, 2), path)
    monkeypatch.delitem(sys.modules, "user_net")
    (tmp_path / "user_net.py").unlink()  # the class the pickle names cannot be imported any more
    read_fails(path, "not available here.*user_net", allow_pickle=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"a": torch.ones(1)}, path)
    path.chmod(0)
    with pytest.raises(ArtifactError, match="permissions"):
        read_artifact(path)

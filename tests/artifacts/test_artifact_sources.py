"""Every SOURCE form loads: files, registry references, torchvision weights from the TORCH_HOME cache."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from torchvision.models import ResNet18_Weights

from retrain.artifacts import sources
from retrain.artifacts.formats import save_weights_pth
from retrain.artifacts.sources import load_source, parent_record
from retrain.errors import ArtifactError, RegistryError
from retrain.utils.io import sha256_file

HUB_FILE = "resnet18-f37072fd.pth"  # the name torch.hub gives torchvision's ResNet18 IMAGENET1K_V1 file


def test_file_path(tmp_path, small_state):
    save_weights_pth(small_state, tmp_path / "w.pth")
    artifact = load_source(str(tmp_path / "w.pth"), model_dir=tmp_path / "models")
    assert artifact.kind == "state_dict"
    assert artifact.metadata is None
    assert torch.equal(artifact.state_dict["fc.weight"], small_state["fc.weight"])


@pytest.mark.parametrize("ref", ["cats@v2", "cats@2", "cats@v002", "cats@latest", "cats"])
def test_registry_reference(tmp_path, small_state, publish_version, ref):
    publish_version(small_state)
    publish_version(small_state)
    artifact = load_source(ref, model_dir=tmp_path / "models")
    assert artifact.kind == "safetensors"  # preferred: it never unpickles
    assert artifact.path == tmp_path / "models" / "cats" / "v002" / "model.safetensors"
    assert artifact.metadata is not None
    assert (artifact.metadata["name"], artifact.metadata["version"]) == ("cats", 2)
    assert artifact.metadata["class_names"] == ["cat", "dog", "élan"]
    assert torch.equal(artifact.state_dict["fc.bias"], small_state["fc.bias"])


def test_version_folder_and_files_in_it_carry_the_version_metadata(tmp_path, small_state, publish_version):
    folder = publish_version(small_state)
    by_folder = load_source(str(folder), model_dir=tmp_path / "elsewhere")
    by_file = load_source(str(folder / "weights.pth"), model_dir=tmp_path / "elsewhere")
    assert by_file.kind == "state_dict"
    for artifact in (by_folder, by_file):
        assert artifact.metadata is not None
        assert (artifact.metadata["name"], artifact.metadata["version"]) == ("cats", 1)
        assert artifact.metadata["metrics"] == {"val/acc": 0.75, "test/acc": 0.5}


def test_latest_link_path_is_recorded_as_the_version_it_points_to(tmp_path, small_state, publish_version):
    publish_version(small_state)
    folder = publish_version(small_state)
    artifact = load_source(str(tmp_path / "models" / "cats" / "latest"), model_dir=tmp_path)
    assert artifact.path == folder / "model.safetensors"
    assert artifact.metadata is not None and artifact.metadata["version"] == 2


def test_unknown_registry_name_and_version(tmp_path, small_state, publish_version):
    publish_version(small_state)
    with pytest.raises(RegistryError, match="known names: cats"):
        load_source("dogs@latest", model_dir=tmp_path / "models")
    with pytest.raises(RegistryError, match="Known versions: v001"):
        load_source("cats@v9", model_dir=tmp_path / "models")


def test_folder_without_weights(tmp_path):
    with pytest.raises(ArtifactError, match="without model weights"):
        load_source(str(tmp_path), model_dir=tmp_path)


def test_missing_file_and_unknown_words(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_source("runs/last.ckpt", model_dir=tmp_path)
    with pytest.raises(ArtifactError, match=r"registry reference .*torchvision weights") as info:
        load_source("my best model", model_dir=tmp_path)
    assert "Fix:" in str(info.value)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME; returns the folder torch.hub keeps weights files in."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def _offline(url: str, dest: Path) -> None:
    raise urllib.error.URLError("[Errno -2] Name or service not known")


def test_torchvision_weights_missing_offline_says_where_to_put_the_file(torch_home, monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "_download", _offline)
    with pytest.raises(ArtifactError) as info:
        load_source("IMAGENET1K_V1", model_dir=tmp_path)
    message = str(info.value)
    assert HUB_FILE in message
    assert str(torch_home) in message
    assert f"https://download.pytorch.org/models/{HUB_FILE}" in message
    assert "Name or service not known" in message


def test_torchvision_weights_from_cache_with_their_facts(torch_home, resnet_state, tmp_path):
    save_weights_pth(resnet_state, torch_home / HUB_FILE)
    artifact = load_source("ResNet18_Weights.IMAGENET1K_V1", model_dir=tmp_path, check_hash=False)
    assert artifact.kind == "torchvision"
    assert artifact.path == torch_home / HUB_FILE
    assert torch.equal(artifact.state_dict["conv1.weight"], resnet_state["conv1.weight"])
    metadata = artifact.metadata
    assert metadata is not None
    assert metadata["name"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert metadata["num_classes"] == 1000
    assert metadata["class_names"] == ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert metadata["preprocessing"] == {
        "image_size": 224,
        "resize": 256,
        "crop": 224,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear",
    }
    record = parent_record("IMAGENET1K_V1", artifact)
    assert record == {
        "source": "IMAGENET1K_V1",
        "path": str(torch_home / HUB_FILE),
        "sha256": sha256_file(torch_home / HUB_FILE),
        "name": "ResNet18_Weights.IMAGENET1K_V1",
        "version": None,
    }


def test_torchvision_hash_is_checked(torch_home, small_state, monkeypatch, tmp_path):
    save_weights_pth(small_state, torch_home / HUB_FILE)
    with pytest.raises(ArtifactError, match=r"integrity check.*promises f37072fd") as info:
        load_source("IMAGENET1K_V1", model_dir=tmp_path)
    assert "delete it" in str(info.value)
    # A file whose name carries its real hash prefix passes, as torchvision's own file does.
    good_name = f"resnet18-{sha256_file(torch_home / HUB_FILE)[:8]}.pth"
    (torch_home / HUB_FILE).rename(torch_home / good_name)
    weights = ResNet18_Weights.IMAGENET1K_V1.value
    monkeypatch.setattr(weights, "url", f"https://download.pytorch.org/models/{good_name}")
    assert load_source("DEFAULT", model_dir=tmp_path).path == torch_home / good_name


def test_torchvision_download_lands_in_the_hub_cache(torch_home, small_state, monkeypatch, tmp_path):
    fetched: list[str] = []

    def fake_download(url: str, dest: Path) -> None:
        fetched.append(url)
        save_weights_pth(small_state, dest)

    monkeypatch.setattr(sources, "_download", fake_download)
    artifact = load_source("IMAGENET1K_V1", model_dir=tmp_path, check_hash=False)
    assert fetched == [f"https://download.pytorch.org/models/{HUB_FILE}"]
    assert artifact.path == torch_home / HUB_FILE
    load_source("IMAGENET1K_V1", model_dir=tmp_path, check_hash=False)
    assert len(fetched) == 1  # the second time comes from the cache


def test_damaged_torchvision_cache_file(torch_home, tmp_path):
    torch_home.mkdir(parents=True)
    (torch_home / HUB_FILE).write_bytes(b"PK\x03\x04 half a download")
    with pytest.raises(ArtifactError, match=f"damaged.*delete {torch_home / HUB_FILE}"):
        load_source("IMAGENET1K_V1", model_dir=tmp_path, check_hash=False)


def test_torchvision_names_that_do_not_fit(torch_home, tmp_path):
    with pytest.raises(ArtifactError, match="IMAGENET1K_V1"):  # lists the valid names
        load_source("IMAGENET1K_V9", model_dir=tmp_path)
    with pytest.raises(ArtifactError, match="do not belong to arch 'resnet18'"):
        load_source("ResNet50_Weights.IMAGENET1K_V1", model_dir=tmp_path)
    with pytest.raises(ArtifactError, match="no pretrained weights for arch 'nonet'"):
        load_source("IMAGENET1K_V1", model_dir=tmp_path, arch="nonet")

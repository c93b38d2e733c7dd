"""Metadata records what made an artifact; JSON files are written atomically and read with clear errors."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from retrain.artifacts.metadata import ArtifactMetadata, Preprocessing, git_commit, new_metadata, software_versions
from retrain.errors import ArtifactError
from retrain.utils.io import atomic_write, read_json, sha256_file, write_json


def test_software_versions_match_installed_packages():
    versions = software_versions()
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    for dist in ("torch", "torchvision", "lightning", "retrain"):
        assert versions[dist] == importlib.metadata.version(dist)


def test_registry_and_metadata_import_neither_torch_nor_lightning():
    code = (
        "import sys, retrain.registry, retrain.artifacts.metadata as m; m.software_versions(); "
        "print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_of_a_repo_and_outside_one(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
    (repo / "sub").mkdir()
    assert git_commit(repo / "sub") == head.strip()
    outside = tmp_path / "plain"
    outside.mkdir()
    assert git_commit(outside) is None


def test_git_commit_without_git_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert git_commit(tmp_path) is None


def test_sha256_file(tmp_path):
    data = bytes(range(256)) * 10_000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_new_metadata_fills_the_schema(tmp_path):
    metadata = new_metadata(
        name="cats",
        version=3,
        arch="resnet18",
        class_names=["cat", "dog"],
        preprocessing=Preprocessing(32, 37, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),  # tuples become JSON lists
        augment="light",
        config={"model": {"freeze": ["stem", "layer1"]}},
        dataset={"root": "/data", "layout": "split_dirs"},
        parent={"source": "IMAGENET1K_V1", "path": None, "sha256": None, "name": None, "version": None},
        freeze=["stem"],
        train_bn=False,
    )
    assert metadata["schema"] == 1
    assert metadata["num_classes"] == 2
    assert metadata["class_names"] == ["cat", "dog"]
    assert metadata["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert metadata["metrics"] == {}
    assert metadata["software"] == software_versions()
    created = datetime.fromisoformat(metadata["created"])
    assert created.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - created) < timedelta(minutes=1)
    # It can travel inside a Lightning checkpoint and come back under weights_only=True.
    torch.save({"retrain": metadata}, tmp_path / "x.ckpt")
    assert torch.load(tmp_path / "x.ckpt", weights_only=True)["retrain"] == metadata
    assert json.loads(json.dumps(metadata)) == metadata


def test_write_json_replaces_atomically_and_round_trips(tmp_path):
    path = tmp_path / "deep" / "metadata.json"
    write_json(path, {"a": 1})
    write_json(path, {"class_names": ["élan", "cat"], "metrics": {"val/acc": 0.5}})
    assert read_json(path) == {"class_names": ["élan", "cat"], "metrics": {"val/acc": 0.5}}
    assert [p.name for p in path.parent.iterdir()] == ["metadata.json"]


def test_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"ok": True})

    def fail(f):
        f.write(b'{"half": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert read_json(path) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_written_files_follow_the_umask_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644  # others can read a shared registry


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "does not exist"), ('{"a": ', "not valid JSON"), ("[1, 2]", "JSON list"), (b"\xff\xfe", "UTF-8")],
)
def test_read_json_errors(tmp_path, content, match):
    path = tmp_path / "metadata.json"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ArtifactError, match=match) as info:
        read_json(path)
    assert str(path) in str(info.value)


FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "metadata_v1.json"  # a v001 published by 86650fd


def test_a_published_metadata_json_loads_typed_and_writes_back_the_same_json():
    written = json.loads(FIXTURE.read_text())
    meta = ArtifactMetadata.from_dict(written, source=FIXTURE)
    assert (meta.name, meta.version, meta.arch, meta.num_classes) == ("pets", 1, "resnet18", 3)
    assert meta.class_names == ["cat", "dog", "fox"] and meta.freeze == ["stem", "layer1", "layer2", "layer3", "layer4"]
    pre = meta.preprocessing
    assert (pre.image_size, pre.resize, pre.crop, pre.interpolation) == (32, 37, 32, "bilinear")
    assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)
    assert meta.dataset["layout"] == "folder" and meta.results["monitor"] == "val/acc"
    assert meta.history[0]["epoch"] == 0 and len(meta.checkpoint_sha256 or "") == 64
    assert meta.extra == {}  # every key of today's files is modelled
    assert list(meta.to_dict().items()) == list(written.items())  # same keys, values and order
    assert ArtifactMetadata.from_dict(meta.to_dict()) == meta


def test_keys_a_later_version_adds_survive_a_round_trip():
    written = {**json.loads(FIXTURE.read_text()), "calibration": {"ece": 0.02}}
    written["preprocessing"] = {**written["preprocessing"], "color_space": "RGB"}
    meta = ArtifactMetadata.from_dict(written)
    assert meta.extra == {"calibration": {"ece": 0.02}} and meta.preprocessing.extra == {"color_space": "RGB"}
    assert meta.to_dict() == written


def test_the_three_facts_other_tools_state_are_enough():
    # torchvision's weights API gives class names and preprocessing; the older preprocessing had no interpolation.
    meta = ArtifactMetadata.from_dict(
        {
            "arch": "resnet18",
            "class_names": ["a", "b"],
            "preprocessing": {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.25] * 3},
            "url": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        }
    )
    assert meta.num_classes == 2 and meta.preprocessing.image_size == 224 and meta.extra["url"].endswith(".pth")
    assert meta.preprocessing.interpolation == "bilinear" and meta.metrics == {} and meta.parent is None


@pytest.mark.parametrize(
    ("drop", "said"),
    [
        ("arch", "models/pets/v001 carries incomplete retrain metadata (arch missing)"),
        (None, "models/pets/v001 carries no retrain metadata (arch, class_names, preprocessing missing)"),
        ("preprocessing.crop", "models/pets/v001 records incomplete preprocessing (crop missing)"),
    ],
)
def test_a_missing_required_key_is_named_with_the_fix(drop, said):
    written = json.loads(FIXTURE.read_text()) if drop else {"name": "pets"}
    if drop == "arch":
        del written["arch"]
    elif drop:
        del written["preprocessing"]["crop"]
    with pytest.raises(ArtifactError) as info:
        ArtifactMetadata.from_dict(written, source="models/pets/v001")
    assert str(info.value).startswith(said)
    assert "Fix: point to the checkpoint or registry version the model came from" in str(info.value)


def test_damaged_values_are_artifact_errors_not_tracebacks():
    written = json.loads(FIXTURE.read_text())
    with pytest.raises(ArtifactError, match="num_classes is 4 but class_names lists 3"):
        ArtifactMetadata.from_dict({**written, "num_classes": 4})
    with pytest.raises(ArtifactError, match="class_names is 'cat,dog', expected a list"):
        ArtifactMetadata.from_dict({**written, "class_names": "cat,dog"})
    with pytest.raises(ArtifactError, match="damaged preprocessing metadata"):
        ArtifactMetadata.from_dict({**written, "preprocessing": {**written["preprocessing"], "crop": "big"}})


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"mean": [0.5]}, r"mean is \[0\.5\], not one number per RGB channel"),
        ({"std": [0.25, 0.25]}, r"std is \[0\.25, 0\.25\], not one number per RGB channel"),
        ({"std": [0.25, 0.0, 0.25]}, r"std is \[0\.25, 0\.0, 0\.25\]: dividing by a value <= 0"),
        ({"crop": 0, "resize": 0}, r"crop is 0"),
        ({"crop": -4}, r"crop is -4"),
        ({"resize": 30}, r"resize is 30, smaller than crop 32"),
    ],
)
def test_preprocessing_values_no_pipeline_can_use_are_refused_naming_the_file_and_field(change, said):
    good = {"image_size": 32, "resize": 37, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert Preprocessing.from_dict(good).resize == 37
    with pytest.raises(ArtifactError, match=rf"exports/model\.onnx has damaged preprocessing metadata \({said}"):
        Preprocessing.from_dict({**good, **change}, source="exports/model.onnx")

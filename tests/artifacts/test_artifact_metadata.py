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

import pytest
import torch

from retrain.artifacts.metadata import git_commit, new_metadata, software_versions
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
        preprocessing={"image_size": 32, "mean": (0.5, 0.5, 0.5)},  # a tuple comes back as a JSON list
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

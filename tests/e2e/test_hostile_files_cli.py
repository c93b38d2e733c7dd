"""Hostile or broken files given to train, eval, predict and export: no code runs, nothing saved changes.

Every file kind goes through the real tasks in-process with the real config (they fail before any Trainer
starts, so this is fast): as train's model.init_from and ckpt_path, and to eval; the pickles also to predict and
export (which load models exactly as eval does), and once through the CLI, as a user meets them.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from clitools import FAST, REPO, make_imagefolder, run_cli
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from retrain.artifacts.formats import save_safetensors
from retrain.artifacts.registry import publish, reserve_version
from retrain.errors import ArtifactError, UnsafePickleError
from retrain.tasks.eval import evaluate
from retrain.tasks.export import export
from retrain.tasks.predict import predict
from retrain.tasks.train import train
from retrain.utils.hydra import register_resolvers
from retrain.utils.io import write_json

pytestmark = pytest.mark.e2e

CLASSES = ["cat", "dog", "fox"]


class Payload:
    """Unpickling this calls open(marker, "w"): code execution the test can see as a new file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def lightning_checkpoint(arch: str, path: Path) -> Path:
    """A checkpoint shaped like ours, from `arch`, with metadata that fits the test data's classes."""
    net = getattr(torchvision.models, arch)(num_classes=len(CLASSES))
    meta = {
        "arch": arch,
        "class_names": CLASSES,
        "preprocessing": {"image_size": 32, "resize": 37, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
    }
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 0, "global_step": 0, "retrain": meta}, path)
    return path


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_files(folder: Path, marker: Path) -> dict[str, Path]:
    """One file of each hostile or broken kind; the keys name the kind."""
    folder.mkdir()
    weights = torchvision.models.resnet18(num_classes=len(CLASSES)).state_dict()
    pickle_zip = folder / "evil.ckpt"
    torch.save({"state_dict": {"model.fc.bias": torch.zeros(3)}, "epoch": 0, "hook": Payload(marker)}, pickle_zip)
    pickle_raw = folder / "evil.pth"
    pickle_raw.write_bytes(pickle.dumps({"fc.weight": Payload(marker)}, protocol=2))
    torch.save(weights, folder / "cut.pth")
    save_safetensors(weights, {"arch": "resnet18"}, folder / "cut.safetensors")
    (folder / "json.ckpt").write_text('{"state_dict": {"fc.weight": [1, 2]}}')
    (folder / "empty.ckpt").write_bytes(b"")
    (folder / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    return {
        "pickle in a torch zip": pickle_zip,
        "raw pickle": pickle_raw,
        "truncated ckpt": truncated(lightning_checkpoint("resnet18", folder / "cut.ckpt")),
        "truncated pth": truncated(folder / "cut.pth"),
        "truncated safetensors": truncated(folder / "cut.safetensors"),
        "json renamed ckpt": folder / "json.ckpt",
        "empty file": folder / "empty.ckpt",
        "random bytes": folder / "random.ckpt",
        "another architecture": lightning_checkpoint("resnet34", folder / "resnet34.ckpt"),
    }


# What each message must say, besides the file's path and a fix.
EXPECTED = {
    "pickle in a torch zip": "allow_pickle",
    "raw pickle": "allow_pickle",
    "truncated ckpt": "truncated or corrupt",
    "truncated pth": "truncated or corrupt",
    "truncated safetensors": "truncated or corrupt",
    "json renamed ckpt": "JSON text file, not weights",
    "empty file": "is empty",
    "random bytes": "not in any weights format",
    "another architecture": "model.arch=resnet34",
}
PICKLES = ("pickle in a torch zip", "raw pickle")
EXTRA = {"train": ("extras.print_config=false", "data.validate=off")}  # the scan is not what is tested here


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Data, a registry with one published version, and the hostile files, all in one folder."""
    root = tmp_path_factory.mktemp("hostile")
    data = make_imagefolder(root / "images", per_class=2)
    reservation = reserve_version(root / "models", "resnet18")
    save_safetensors({"fc.bias": torch.zeros(3)}, {"name": "resnet18"}, reservation.staging / "model.safetensors")
    write_json(reservation.staging / "metadata.json", {"name": "resnet18", "version": 1})
    publish(reservation)
    marker = root / "PWNED"
    return {"root": root, "data": data, "marker": marker, "files": make_files(root / "files", marker)}


def snapshot(root: Path) -> dict[str, tuple[int, ...] | str]:
    """Every file under root: the registry's by content, the rest (checkpoints of 50-90 MB) by size and mtime."""
    state: dict[str, tuple[int, ...] | str] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            stat = path.stat()
            state[str(path)] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
            if "models" in path.parts:
                state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def composed(root: Path, config: str, *overrides: str) -> DictConfig:
    """The real config with overrides, as Hydra hands it to a task, writing under root."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        overrides = (f"paths.root_dir={root}", *EXTRA.get(config, ()), *overrides)
        cfg = compose(config, overrides=list(overrides), return_hydra_config=True)
    run_dir = root / "runs" / config
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def fails_cleanly(world: dict[str, Any], kind: str, task: Callable[[DictConfig], Any], cfg: DictConfig) -> None:
    """The task raises our error for this file, naming it and the fix; no code ran; no file changed."""
    path = world["files"][kind]
    before = snapshot(world["root"])
    with pytest.raises(ArtifactError) as info:
        task(cfg)
    message = str(info.value)
    assert str(path) in message and "Fix:" in message, message
    assert EXPECTED[kind] in message, message
    if kind in PICKLES:
        assert isinstance(info.value, UnsafePickleError)
    assert not world["marker"].exists(), "the pickle's payload ran"
    assert snapshot(world["root"]) == before  # nothing saved was touched, nothing was written


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_as_init_from(world: dict[str, Any], kind: str) -> None:
    cfg = composed(world["root"], "train", f"data.root={world['data']}", f"model.init_from={world['files'][kind]}")
    fails_cleanly(world, kind, train, cfg)


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_as_ckpt_path_to_resume(world: dict[str, Any], kind: str) -> None:
    cfg = composed(world["root"], "train", f"data.root={world['data']}", f"ckpt_path={world['files'][kind]}")
    fails_cleanly(world, kind, train, cfg)


@pytest.mark.parametrize("kind", [k for k in EXPECTED if k != "another architecture"])  # eval builds any arch
def test_to_eval(world: dict[str, Any], kind: str) -> None:
    cfg = composed(world["root"], "eval", f"data.root={world['data']}", f"ckpt_path={world['files'][kind]}")
    fails_cleanly(world, kind, evaluate, cfg)


@pytest.mark.parametrize("kind", PICKLES)
def test_pickles_to_predict_and_export(world: dict[str, Any], kind: str) -> None:
    path = world["files"][kind]
    output = f"output={world['root'] / 'preds.csv'}"
    cfg = composed(world["root"], "predict", f"ckpt_path={path}", f"input={world['data'] / 'test'}", output)
    fails_cleanly(world, kind, predict, cfg)
    cfg = composed(world["root"], "export", f"ckpt_path={path}", f"data.root={world['data']}")
    fails_cleanly(world, kind, export, cfg)


def test_pickle_through_the_cli_is_refused_in_one_paragraph(world: dict[str, Any]) -> None:
    path = world["files"]["pickle in a torch zip"]
    cwd = world["root"] / "cli"
    cwd.mkdir()
    saved = world["root"] / "files", world["root"] / "models"
    before = [snapshot(folder) for folder in saved]
    registry = f"paths.model_dir={world['root'] / 'models'}"
    result = run_cli("train.py", f"data.root={world['data']}", f"model.init_from={path}", registry, *FAST, cwd=cwd)
    assert result.returncode == 1
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # one paragraph
    assert "allow_pickle" in message and str(path) in message
    assert "Traceback" not in result.stderr
    assert not world["marker"].exists()
    assert [snapshot(folder) for folder in saved] == before

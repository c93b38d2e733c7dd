"""The seed workflow, end to end: plain torchvision weights in, head-only retraining, versions out, retrain again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from clitools import FAST, assert_ok, make_imagefolder, run_cli
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory: pytest.TempPathFactory, imagefolder: Path):
    """Steps 1-2: torchvision saves a 1000-class state_dict; retrain trains only a new 3-class head on it."""
    cwd = tmp_path_factory.mktemp("seed")
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    reference.train()
    with torch.no_grad():  # give BatchNorm real running statistics, as pretrained weights have
        reference(torch.randn(8, 3, 32, 32))
    torch.save(reference.state_dict(), cwd / "w.pth")
    result = run_cli(
        "train.py",
        f"data.root={imagefolder}",
        "model.init_from=w.pth",
        "model.freeze=true",
        "model.bn_stats=frozen",  # frozen statistics: this run checks that nothing but the head changes
        "trainer.max_epochs=2",
        "save.full_model=true",
        *FAST,
        cwd=cwd,
    )
    assert_ok(result)
    result.first = result.results()
    return result


def test_head_only_training_keeps_every_other_tensor_bit_identical(seed_run) -> None:
    source = torch.load(seed_run.cwd / "w.pth", weights_only=True)
    version = Path(seed_run.first["registry"]["path"])
    trained = torch.load(version / "weights.pth", weights_only=True)
    assert trained["fc.weight"].shape == (3, 512) and source["fc.weight"].shape == (1000, 512)
    for key, tensor in source.items():
        if not key.startswith("fc."):
            assert torch.equal(trained[key], tensor), key  # BN running stats included
    assert "head re-initialised: w.pth has 1000 classes, data has 3" in seed_run.output


def test_published_weights_load_into_plain_torchvision_with_same_logits(seed_run) -> None:
    version = Path(seed_run.first["registry"]["path"])
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(torch.load(version / "weights.pth"))  # strict, unchanged: the user's own code
    # The version was made from the run's best checkpoint, which stays in the run folder for resuming.
    ckpt = torch.load(seed_run.first["best_checkpoint"], map_location="cpu", weights_only=True)
    from_ckpt = torchvision.models.resnet18(num_classes=3)
    from_ckpt.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    from_safetensors = torchvision.models.resnet18(num_classes=3)
    from_safetensors.load_state_dict(load_file(version / "model.safetensors"))
    images = torch.randn(4, 3, 32, 32)
    logits = [m.eval()(images) for m in (model, from_ckpt, from_safetensors)]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


def test_a_version_holds_weights_and_hashes_not_the_optimizer(seed_run) -> None:
    version = Path(seed_run.first["registry"]["path"])
    sizes = {p.name: p.stat().st_size for p in version.iterdir() if p.is_file()}
    assert set(sizes) == {"weights.pth", "model.safetensors", "model_full.pt", "metadata.json", "results.json"}
    assert sizes["weights.pth"] + sizes["model.safetensors"] <= 100e6  # 180 MB with model.ckpt's optimizer state
    meta = json.loads((version / "metadata.json").read_text())
    assert set(meta["files"]) >= {"weights.pth", "model.safetensors", "model_full.pt", "results.json"}
    assert meta["checkpoint_path"] == seed_run.first["best_checkpoint"]


def test_a_version_edited_after_publishing_is_refused_by_eval(seed_run, imagefolder: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(seed_run.cwd / "models", models, symlinks=True)
    metadata = models / "resnet18" / "v001" / "metadata.json"
    meta = json.loads(metadata.read_text())
    metadata.write_text(json.dumps({**meta, "class_names": ["dog", "cat", "fox"]}))  # every label swapped
    result = run_cli(
        "eval.py", "ckpt_path=resnet18@v1", f"data.root={imagefolder}", f"paths.model_dir={models}", cwd=tmp_path
    )
    assert result.returncode == 1
    assert "Refusing to load resnet18@v001" in result.stderr and "Traceback" not in result.stderr
    assert 'class_names is ["dog", "cat", "fox"] in metadata.json, expected ["cat", "dog", "fox"]' in result.stderr


def test_every_artifact_carries_version_date_and_metadata(seed_run) -> None:
    version = Path(seed_run.first["registry"]["path"])
    assert version.name == "v001" and (version.parent / "latest").resolve() == version
    meta = json.loads((version / "metadata.json").read_text())
    assert meta["version"] == 1 and meta["name"] == "resnet18" and meta["created"].startswith("20")
    assert meta["arch"] == "resnet18" and meta["class_names"] == ["cat", "dog", "fox"]
    assert meta["preprocessing"] == {
        "image_size": 32,
        "resize": 37,
        "crop": 32,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear",
    }
    assert meta["config"]["model"]["freeze"] is True and meta["freeze"] == [
        "stem",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    ]
    assert meta["dataset"]["split_sizes"] == {"train": 24, "val": 12, "test": 12}
    assert meta["dataset"]["class_counts"]["train"] == {"cat": 8, "dog": 8, "fox": 8}
    assert len(meta["dataset"]["fingerprint"]) == 64
    assert {"val/acc", "test/acc"} <= set(meta["metrics"]) and meta["epoch"] in (0, 1)
    assert set(meta["software"]) >= {"torch", "torchvision", "lightning", "retrain", "python"}
    assert "git_commit" in meta
    parent = meta["parent"]
    assert parent["path"] == str(seed_run.cwd / "w.pth") and parent["how"] == "init_from"
    assert len(parent["sha256"]) == 64
    with safe_open(version / "model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["retrain"])["class_names"] == ["cat", "dog", "fox"]
    ckpt = torch.load(seed_run.first["best_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["retrain"]["version"] == 1 and ckpt["retrain"]["parent"]["sha256"] == parent["sha256"]
    assert (version / "model_full.pt").is_file()  # opted in with save.full_model=true


def test_retrain_from_registry_on_new_classes_names_the_parent(seed_run, tmp_path: Path) -> None:
    four = make_imagefolder(tmp_path / "four", classes=("a", "b", "c", "d"), per_class=4)
    result = run_cli(
        "train.py",
        f"data.root={four}",
        "model.init_from=resnet18@latest",
        "model.freeze=[stem,layer1,layer2]",
        "trainer.max_epochs=1",
        *FAST,
        cwd=seed_run.cwd,
    )
    assert_ok(result)
    results = result.results()
    assert results["class_names"] == ["a", "b", "c", "d"]
    meta = json.loads((Path(results["registry"]["path"]) / "metadata.json").read_text())
    assert meta["version"] == 2 and meta["parent"]["name"] == "resnet18" and meta["parent"]["version"] == 1
    assert "data has 4" in result.output
    assert "resnet18@v002 has a new class set: [a, b, c, d] (4 classes) instead of resnet18@v001's [cat, dog, fox]" in (
        result.output
    )


def test_eval_takes_a_registry_reference(seed_run, imagefolder: Path) -> None:
    result = run_cli("eval.py", "ckpt_path=resnet18@v1", f"data.root={imagefolder}", cwd=seed_run.cwd)
    assert_ok(result)
    assert result.results("eval")["test"]["test/acc"] == pytest.approx(seed_run.first["test"]["test/acc"], abs=1e-6)

"""User mistakes stop train/eval before any training with one paragraph naming what, expected and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from clitools import composed, make_imagefolder

from retrain.errors import ArtifactError, ConfigError, DataError, RegistryError, UnsafePickleError
from retrain.tasks.train import train


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("errs") / "images", per_class=2)


def test_missing_root_says_which_path_and_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist.*Expected either DIR/train.*Fix:"):
        train(composed(tmp_path, f"data.root={tmp_path / 'nope'}"))


def test_unset_root_points_at_the_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.root is not set.*python train.py data.root="):
        train(composed(tmp_path))


def test_folder_without_class_folders_or_images(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class sub-folders"):
        train(composed(tmp_path, f"data.root={tmp_path / 'empty'}"))
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"No images found.*one sub-folder per class"):
        train(composed(tmp_path, f"data.root={tmp_path / 'noimg'}", "data.validate=off"))


def test_val_classes_that_differ_from_train(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", per_class=2)
    (root / "val" / "fox").rename(root / "val" / "wolf")
    with pytest.raises(DataError, match=r"missing \['fox'\], unexpected \['wolf'\]"):
        train(composed(tmp_path, f"data.root={root}", "data.validate=off"))


def test_unknown_freeze_stage_lists_valid_names(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(ConfigError, match=r"layer9.*stem.*layer4"):
        train(composed(tmp_path, f"data.root={folder}", "model.freeze=[stem,layer9]"))


def test_missing_ckpt_path_and_missing_last(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(ConfigError, match=r"ckpt_path=.*gone.ckpt does not exist.*Fix:"):
        train(composed(tmp_path, f"data.root={folder}", f"ckpt_path={tmp_path / 'gone.ckpt'}"))
    with pytest.raises(ConfigError, match=r"ckpt_path=last found no last.ckpt"):
        train(composed(tmp_path, f"data.root={folder}", "ckpt_path=last"))


def test_resnet50_weights_for_resnet18_name_the_architecture(tmp_path: Path, folder: Path) -> None:
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(num_classes=3).state_dict(), path)
    with pytest.raises(ArtifactError, match="resnet50"):
        train(composed(tmp_path, f"data.root={folder}", f"model.init_from={path}"))


def test_pickled_model_needs_allow_pickle_and_runs_no_code(tmp_path: Path, folder: Path) -> None:
    path = tmp_path / "full.pt"
    torch.save(torchvision.models.resnet18(num_classes=3), path)
    with pytest.raises(UnsafePickleError, match="allow_pickle"):
        train(composed(tmp_path, f"data.root={folder}", f"model.init_from={path}"))


def test_unknown_registry_name_or_version(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(RegistryError, match="nosuchmodel"):
        train(composed(tmp_path, f"data.root={folder}", "model.init_from=nosuchmodel@v1"))


def test_unwritable_registry_fails_before_training(tmp_path: Path, folder: Path) -> None:
    (tmp_path / "models").write_text("a file where the registry folder should be")
    with pytest.raises(RegistryError):
        train(composed(tmp_path, f"data.root={folder}", f"paths.model_dir={tmp_path / 'models'}"))
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training
    assert (tmp_path / "models").read_text().startswith("a file")

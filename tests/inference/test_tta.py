"""Test-time augmentation: flip and five_crop views, averaged probabilities, results.json's with/without numbers,
and data.hflip=false, which keeps mirrored images out of training and out of tta."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clitools import CLASSES, composed, save_random_model
from torchvision import transforms as T

from retrain.artifacts.formats import save_safetensors
from retrain.artifacts.metadata import ArtifactMetadata
from retrain.cli.report_cmd import rebuild
from retrain.data.datamodule import ImageFolderDataModule
from retrain.data.splits import discover
from retrain.data.transforms import mirrorable, preprocessing, train_transforms
from retrain.errors import ConfigError
from retrain.inference.tta import averaged_probs, check_tta, tta_transform, views
from retrain.model.resnet import build_resnet
from retrain.tasks.eval import evaluate
from retrain.tasks.predict import predict


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 3-class ResNet18 for 32 px images, mirrorable (no hflip key, as every model before data.hflip)."""
    return save_random_model(tmp_path_factory.mktemp("model") / "model.safetensors")


@pytest.fixture(scope="module")
def unmirrorable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kind of model, trained (as its metadata says) with data.hflip=false."""
    path = tmp_path_factory.mktemp("digits") / "digits.safetensors"
    meta = {"arch": "resnet18", "class_names": list(CLASSES), "preprocessing": preprocessing(32, hflip=False).to_dict()}
    save_safetensors(build_resnet("resnet18", len(CLASSES)).state_dict(), meta, path)
    return path


def test_flip_averages_the_image_and_its_mirror_and_five_crop_the_corners_and_centre() -> None:
    images = torch.randn(2, 3, 37, 37, generator=torch.Generator().manual_seed(0))
    crops = views(images, "five_crop", 32)
    assert [tuple(v.shape) for v in crops] == [(2, 3, 32, 32)] * 5
    assert torch.equal(crops[0], images[..., :32, :32]) and torch.equal(crops[3], images[..., 5:, 5:])
    net = build_resnet("resnet18", 3).eval()
    with torch.no_grad():
        flipped = averaged_probs(net, images, "flip", 32)
        one, mirror = net(images).softmax(1), net(images.flip(-1)).softmax(1)
    assert torch.allclose(flipped, (one + mirror) / 2, atol=1e-6)
    assert torch.allclose(flipped.sum(1), torch.ones(2))
    five = tta_transform(preprocessing(32), "five_crop")(T.ToPILImage()(torch.rand(3, 50, 40)))
    assert tuple(five.shape) == (3, 37, 37)  # the resize square the crops are cut from


def test_data_hflip_false_keeps_mirrors_out_of_training_and_is_recorded(imagefolder: Path) -> None:
    data = ImageFolderDataModule(discover(imagefolder), image_size=32, hflip=False)
    assert not any(isinstance(t, T.RandomHorizontalFlip) for t in data.train_transform.transforms)
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in train_transforms(preprocessing(32), "light").transforms)
    recorded = data.preprocessing.to_dict()
    assert recorded["hflip"] is False and "hflip" not in preprocessing(32).to_dict()  # earlier artifacts unchanged
    assert not mirrorable(
        ArtifactMetadata.from_dict({"arch": "resnet18", "class_names": ["a"], "preprocessing": recorded}).preprocessing
    )


def test_flip_is_refused_for_a_model_trained_not_to_be_mirrored(
    unmirrorable: Path, imagefolder: Path, tmp_path: Path
) -> None:
    pre = preprocessing(32, hflip=False)
    assert check_tta("five_crop", pre, source="m") == "five_crop"
    with pytest.raises(ConfigError, match=r"data.hflip=false.*Fix: tta=five_crop"):
        check_tta("flip", pre, source="m")
    with pytest.raises(ConfigError, match=r"tta=rotate is not a test-time augmentation.*Fix: e.g. tta=five_crop"):
        check_tta("rotate", pre, source="m")
    cfg = composed(tmp_path, f"ckpt_path={unmirrorable}", f"data.root={imagefolder}", "tta=flip", config="eval")
    with pytest.raises(ConfigError, match=r"trained with data\.hflip=false"):
        evaluate(cfg)


def test_eval_records_accuracy_with_and_without_tta_and_the_time(
    model: Path, imagefolder: Path, tmp_path: Path
) -> None:
    overrides = (f"ckpt_path={model}", f"data.root={imagefolder}", "data.num_workers=0", "trainer.accelerator=cpu")
    results = evaluate(composed(tmp_path, *overrides, "tta=flip", config="eval"))
    tta = results["tta"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["tta"] == tta
    assert (tta["mode"], tta["views"], tta["images"]) == ("flip", 2, results["num_images"])
    # Without tta, the same images score as Lightning's test did: the same model, pipeline and split.
    assert tta["acc"]["plain"] == pytest.approx(results["test"]["test/acc"], abs=1e-6)
    assert tta["bal_acc"]["plain"] == pytest.approx(results["test"]["test/bal_acc"], abs=1e-6)
    assert set(tta["acc"]) == set(tta["bal_acc"]) == set(tta["seconds"]) == {"plain", "tta"}
    assert tta["time_ratio"] == pytest.approx(tta["seconds"]["tta"] / tta["seconds"]["plain"], rel=0.05)


def test_predict_and_report_take_tta(model: Path, imagefolder: Path, tmp_path: Path) -> None:
    image = imagefolder / "test" / "cat" / "000.png"
    for mode in ("none", "five_crop"):
        out = tmp_path / f"{mode}.json"
        cfg = composed(
            tmp_path, f"ckpt_path={model}", f"input={image}", f"output={out}", f"tta={mode}", config="predict"
        )
        assert predict(cfg)["tta"] == mode
    plain, five = (json.loads((tmp_path / f"{mode}.json").read_text())[0] for mode in ("none", "five_crop"))
    assert plain["top_k"] != five["top_k"]  # the five crops' average, not the centre crop alone
    assert sum(row["prob"] for row in five["top_k"]) == pytest.approx(1.0, abs=1e-4)
    report = rebuild(str(model), out=tmp_path / "report", data_root=str(imagefolder), tta="five_crop")
    assert "(tta=five_crop)" in report.read_text()

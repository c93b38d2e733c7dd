"""The fast input pipeline gives the reference pipeline's pixels: speed is not bought with different inputs.

The reference is what a user gets from torchvision: ImageFolder's PIL loader, then the eval transforms.
Ours is the dataset retrain's DataModule gives its loaders, which lets big JPEGs decode at 1/2..1/8 scale.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _synthetic import photo
from PIL import Image
from torchvision import datasets

from retrain.data.datamodule import ImageFolderDataModule
from retrain.data.images import RANDOM_CROP_DRAFT_MARGIN
from retrain.data.splits import DataSplits
from retrain.data.transforms import MIN_CROP_SCALE, eval_transforms, preprocessing

STD = torch.tensor(preprocessing().std).view(3, 1, 1)


def one_image_split(tmp_path: Path, name: str, img: Image.Image) -> DataSplits:
    path = tmp_path / "c" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)
    samples = [(str(path), 0)]
    return DataSplits(tmp_path, "split", ["c"], {"train": samples, "val": samples})


def gap(tmp_path: Path, name: str, img: Image.Image) -> torch.Tensor:
    """|ours - reference| per output value of the eval pipeline, in [0, 1] pixel units."""
    splits = one_image_split(tmp_path, name, img)
    ours = ImageFolderDataModule(splits, image_size=224, num_workers=0).dataset("val")[0][0]
    reference = datasets.ImageFolder(str(tmp_path), eval_transforms(preprocessing(224)))[0][0]
    assert ours.shape == reference.shape == (3, 224, 224)
    return (ours - reference).abs() * STD


def test_a_phone_photo_decoded_at_one_eighth_scale_matches_the_reference(tmp_path: Path) -> None:
    # 4000x3000 is the size that the decoder shrinks most (1/8); measured mean 0.0023, max 0.031.
    diff = gap(tmp_path, "phone.jpg", photo(4000, 3000))
    assert diff.mean() < 0.005
    assert diff.max() < 0.05


@pytest.mark.parametrize("name", ["web.jpg", "screenshot.png"])
def test_small_images_give_exactly_the_reference_pixels(tmp_path: Path, name: str) -> None:
    assert gap(tmp_path, name, photo(500, 375)).max() == 0


@pytest.mark.parametrize("augment", ["light", "strong"])
@pytest.mark.parametrize("size", [(4000, 3000), (3000, 4000), (4032, 2268), (1600, 1200)])
def test_train_decoding_never_upsamples_the_smallest_random_crop(
    tmp_path: Path, augment: str, size: tuple[int, int]
) -> None:
    flat = Image.new("RGB", size, (120, 80, 40))  # flat: a tiny file, decoded in no time
    splits = one_image_split(tmp_path, "flat.jpg", flat)
    train = ImageFolderDataModule(splits, image_size=224, augment=augment, num_workers=0).dataset("train")
    width, height = train.load(splits.samples["train"][0][0]).size
    # RandomResizedCrop's smallest crop: MIN_CROP_SCALE of the area at aspect 3:4 or 4:3.
    smallest_crop_side = math.sqrt(MIN_CROP_SCALE[augment] * 3 / 4 * width * height)
    assert smallest_crop_side >= RANDOM_CROP_DRAFT_MARGIN * 224
    if size == (4000, 3000) and augment == "light":
        assert (width, height) == (500, 375)  # the decoder skips 63/64 of the pixels, as for eval

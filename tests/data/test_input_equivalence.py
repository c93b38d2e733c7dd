"""The fast input pipeline gives the reference pipeline's pixels: speed is not bought with different inputs.

The reference is what a user gets from torchvision: ImageFolder's PIL loader, then the eval transforms.
Ours is the dataset retrain's DataModule gives its loaders, which lets big JPEGs decode at 1/2..1/8 scale.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from retrain.data.datamodule import ImageFolderDataModule, decode_min_size
from retrain.data.images import DRAFT_MARGIN, open_rgb
from retrain.data.splits import DataSplits
from retrain.data.transforms import MIN_CROP_SCALE, eval_transforms, preprocessing

STD = torch.tensor(preprocessing()["std"]).view(3, 1, 1)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour regions, hard edges and noise: a JPEG of it is about as big as a real photo's."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((height // 100 + 2, width // 100 + 2, 3)) * 255).astype(np.uint8)
    values = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    edges = np.sign(np.sin(np.arange(width, dtype=np.float32) / (width / 37)))
    values += 40 * edges[None, :, None]
    values += 6 * rng.standard_normal(values.shape, dtype=np.float32)
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))


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
def test_train_decoding_keeps_the_margin_for_the_smallest_random_crop(
    tmp_path: Path, augment: str, size: tuple[int, int]
) -> None:
    path = tmp_path / "flat.jpg"
    Image.new("RGB", size, (120, 80, 40)).save(path, quality=90)  # flat: a tiny file, decoded in no time
    pre = preprocessing(224)
    width, height = open_rgb(path, decode_min_size(pre, augment, "train")).size
    # RandomResizedCrop's smallest crop: MIN_CROP_SCALE of the area at aspect 3:4 or 4:3.
    smallest_crop_side = math.sqrt(MIN_CROP_SCALE[augment] * 3 / 4 * width * height)
    assert smallest_crop_side >= DRAFT_MARGIN * pre["crop"]
    if size == (4000, 3000) and augment == "light":
        assert (width, height) == (1000, 750)  # the bound still lets the decoder skip 15/16 of the pixels

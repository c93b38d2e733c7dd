"""The preprocessing presets users rely on: the PyTorch-docs eval pipeline, scaled, and the augmentation presets."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from retrain.data.transforms import eval_transforms, preprocessing, train_transforms
from retrain.errors import ConfigError


def test_default_eval_preset_is_the_torchvision_docs_pipeline() -> None:
    pre = preprocessing(224)
    assert (pre.resize, pre.crop) == (256, 224)
    steps = eval_transforms(pre).transforms
    assert [type(t) for t in steps] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert steps[0].size == 256 and steps[1].size == (224, 224)
    assert list(steps[3].mean) == [0.485, 0.456, 0.406] and list(steps[3].std) == [0.229, 0.224, 0.225]


@pytest.mark.parametrize(("size", "resize"), [(32, 37), (64, 73), (160, 183), (299, 342)])
def test_image_size_scales_resize_and_crop(size: int, resize: int) -> None:
    pre = preprocessing(size)
    assert (pre.resize, pre.crop) == (resize, size)
    out = eval_transforms(pre)(Image.new("RGB", (400, 300)))
    assert out.shape == (3, size, size)


def test_augment_none_is_exactly_eval_and_presets_differ() -> None:
    pre = preprocessing(32)
    image = Image.effect_noise((50, 40), 60).convert("RGB")
    assert torch.equal(train_transforms(pre, "none")(image), eval_transforms(pre)(image))
    torch.manual_seed(0)
    light = train_transforms(pre, "light")(image)
    assert light.shape == (3, 32, 32) and not torch.equal(light, eval_transforms(pre)(image))
    assert any(isinstance(t, T.TrivialAugmentWide) for t in train_transforms(pre, "strong").transforms)
    with pytest.raises(ConfigError, match=r"data.augment='heavy'.*none.*light.*strong"):
        train_transforms(pre, "heavy")

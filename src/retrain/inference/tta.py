"""Test-time augmentation: score each image as several views and average their class probabilities.

`tta=flip` scores the image and its mirror; `tta=five_crop` scores the four corner crops and the centre crop of the
resized image (its `resize` x `resize` square) instead of the centre crop alone. Flip is refused for a model whose
images must not be mirrored (trained with `data.hflip=false`: text, digits, road signs). Lightning-free, for
predict.py; analysis/tta_gain.py measures what it gains on labelled images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from retrain.artifacts.metadata import Preprocessing
from retrain.data.transforms import eval_transforms, mirrorable
from retrain.errors import ConfigError

MODES = {"none": 1, "flip": 2, "five_crop": 5}  # mode -> views per image


def check_tta(mode: Any, pre: Preprocessing, *, source: str, option: str = "tta") -> str:
    """`tta`, checked against the model: a known mode, and no mirrored views of images that must not be mirrored."""
    text = "none" if mode is None else str(mode)
    if text not in MODES:
        raise ConfigError(
            f"{option}={mode} is not a test-time augmentation. Expected one of {list(MODES)}: flip averages each "
            "image with its mirror, five_crop the corner and centre crops. Fix: e.g. "
            f"{option}={'flip' if mirrorable(pre) else 'five_crop'}."
        )
    if text == "flip" and not mirrorable(pre):
        raise ConfigError(
            f"{option}=flip would mirror the images, but {source} was trained with data.hflip=false: its images "
            "must not be mirrored (text, digits, signs), and it never saw a mirrored one. Expected tta=none or "
            f"five_crop for it. Fix: {option}=five_crop (no mirroring), or {option}=none."
        )
    return text


def tta_transform(pre: Preprocessing, mode: str) -> Callable[[Any], torch.Tensor]:
    """The per-image transform whose output `views` cuts into the model's inputs.

    none and flip: the eval pipeline. five_crop: Resize(resize) and the centre `resize` square, so the five crops of
    `crop` pixels cover what the single centre crop leaves out.
    """
    if mode != "five_crop":
        return eval_transforms(pre)
    return T.Compose(
        [
            T.Resize(pre.resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(pre.resize),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ]
    )


def views(images: torch.Tensor, mode: str, crop: int) -> list[torch.Tensor]:
    """The batches the model scores for a batch from `tta_transform`: one per view, each (N, 3, crop, crop)."""
    if mode == "flip":
        return [images, images.flip(-1)]
    if mode == "five_crop":
        return list(TF.five_crop(images, [crop, crop]))
    return [images]


def averaged_probs(
    predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, mode: str, crop: int
) -> torch.Tensor:
    """The class probabilities of each image, averaged over its views (a view's NaN makes the average NaN)."""
    probs = [predict(view).float().softmax(dim=1) for view in views(images, mode, crop)]
    return torch.stack(probs).mean(dim=0)

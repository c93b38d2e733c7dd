"""Transform presets: the PyTorch-docs eval pipeline scaled to any size, and train augmentation presets."""

from __future__ import annotations

from torchvision import transforms as T

from retrain.artifacts.metadata import Preprocessing
from retrain.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENT_PRESETS = ("none", "light", "strong")
# The smallest RandomResizedCrop area of each preset: draft decoding must keep enough pixels for it.
MIN_CROP_SCALE = {"none": 1.0, "light": 0.6, "strong": 0.08}


def preprocessing(image_size: int = 224, *, hflip: bool = True) -> Preprocessing:
    """The eval preprocessing facts for `image_size`, stored in every artifact so any tool can rebuild it.

    `hflip=False` (data.hflip) marks images that must not be mirrored; recorded as `"hflip": false`, so that
    eval and predict refuse mirrored test-time views (artifacts without the key are mirrorable).
    """
    if image_size < 8:
        raise ConfigError(f"data.image_size={image_size} is too small; expected at least 8 (224 is standard).")
    resize = round(image_size * 256 / 224)
    extra = {} if hflip else {"hflip": False}
    return Preprocessing(image_size, resize, image_size, IMAGENET_MEAN, IMAGENET_STD, "bilinear", extra=extra)


def mirrorable(pre: Preprocessing) -> bool:
    """Whether a model's images may be mirrored: in training augmentation and as a test-time view."""
    return bool(pre.extra.get("hflip", True))


def eval_transforms(pre: Preprocessing) -> T.Compose:
    """Resize, CenterCrop, ToTensor, Normalize, as the torchvision docs prescribe for ResNets."""
    return T.Compose(
        [
            T.Resize(pre.resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(pre.crop),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ]
    )


def train_transforms(pre: Preprocessing, augment: str) -> T.Compose:
    """The train pipeline for an augmentation preset; `none` is exactly the eval pipeline (deterministic)."""
    if augment not in AUGMENT_PRESETS:
        raise ConfigError(
            f"data.augment={augment!r} is not a preset; expected one of {list(AUGMENT_PRESETS)}, "
            "e.g. data.augment=light."
        )
    if augment == "none":
        return eval_transforms(pre)
    size = pre.crop
    normalize = [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    flip = [T.RandomHorizontalFlip()] if mirrorable(pre) else []  # data.hflip=false: text and digits stay as they are
    if augment == "light":
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=(MIN_CROP_SCALE["light"], 1.0), antialias=True),
                *flip,
                *normalize,
            ]
        )
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(MIN_CROP_SCALE["strong"], 1.0), antialias=True),
            *flip,
            T.TrivialAugmentWide(),
            *normalize,
            T.RandomErasing(p=0.25),
        ]
    )

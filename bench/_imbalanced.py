"""A lopsided ImageFolder: one class ten times the others, told apart by grey levels that overlap.

Each image is one grey level, drawn per class from a normal distribution, under pixel noise. The levels overlap, so
even a perfect model must guess near the borders, and a model trained on the raw counts guesses the large class:
its balanced accuracy falls while plain accuracy on the lopsided data looks fine. Used by bench/imbalance.py and
by the class-balance test, which both ask whether model.class_weights or data.sampler win the small classes back.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from _synthetic import save
from PIL import Image

LEVELS = {"dark": 70.0, "mid": 120.0, "light": 170.0}  # the large class sits between the small ones
LEVEL_SPREAD = 30.0  # standard deviation of an image's grey level within its class
PIXEL_NOISE = 40.0


def grey_image(level: float, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of `level` under pixel noise."""
    pixels = level + rng.normal(0, PIXEL_NOISE, (size, size, 1))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8).repeat(3, axis=2))


def imbalanced_imagefolder(
    root: Path, *, small: int, val: int, ratio: int = 10, size: int = 40, seed: int = 0, large: str = "mid"
) -> Path:
    """root/{train,val}/<class>/*.png: `small` train images per class, `ratio` x as many of `large`; `val` each.

    The val split is balanced, so its accuracy is the balanced accuracy. A finished set is reused.
    """
    if (root / "val").is_dir():
        return root
    rng = np.random.default_rng(seed)
    staging = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    for name, level in LEVELS.items():
        counts = {"train": small * (ratio if name == large else 1), "val": val}
        for split, count in counts.items():
            for i in range(count):
                image = grey_image(rng.normal(level, LEVEL_SPREAD), size, rng)
                save(image, staging / split / name / f"{i:04d}.png")
    staging.rename(root)  # a half-written set is never mistaken for a finished one
    return root

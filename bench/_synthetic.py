"""Photo-like images and ImageFolders made on the spot, so every benchmark runs offline on the same kind of data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def photo(width: int, height: int, seed: int = 0, noise: float = 6.0) -> Image.Image:
    """Smooth colour regions, hard edges and sensor-like noise: compresses about as well as a real photo.

    The noise level sets the JPEG's size, and the size sets the decoding time: at quality 90 a 4000x3000 image
    is about 2.5 MB with noise 6 (a typical 12 MP phone JPEG is 2-5 MB).
    """
    rng = np.random.default_rng(seed)
    coarse = (rng.random((height // 100 + 2, width // 100 + 2, 3)) * 255).astype(np.uint8)
    values = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    columns = np.sign(np.sin(np.arange(width, dtype=np.float32) / (width / 37) + seed))
    rows = np.sign(np.sin(np.arange(height, dtype=np.float32) / (height / 23) + seed))
    values += 40 * np.outer(rows, columns)[..., None]
    values += noise * rng.standard_normal(values.shape, dtype=np.float32)
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))


def save(img: Image.Image, path: Path) -> Path:
    """Save as JPEG (quality 90, 4:2:0 like cameras) or PNG, by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        img.save(path, "PNG", compress_level=6)
    else:
        img.save(path, "JPEG", quality=90)
    return path


def imagefolder(
    root: Path, *, train: int, val: int = 8, classes: int = 3, size: tuple[int, int] = (500, 375), suffix: str = ".jpg"
) -> Path:
    """root/{train,val}/<class>/*: `train` and `val` images in all, spread over the classes."""
    names = [f"class{i}" for i in range(classes)]
    for offset, (split, count) in enumerate((("train", train), ("val", val))):
        for i in range(count):
            image = photo(*size, seed=2 * i + offset)
            save(image, root / split / names[i % classes] / f"{i:05d}{suffix}")
    return root


# Colour tints that classes are told apart by, under heavy noise (random convolutional features separate them too).
TINTS = {
    "red": (200, 70, 70),
    "green": (70, 200, 70),
    "blue": (70, 70, 200),
    "yellow": (200, 200, 70),
    "magenta": (200, 70, 200),
    "cyan": (70, 200, 200),
}


def tinted(tint: tuple[int, int, int], size: int, rng: np.random.Generator, *, domain: str = "photo") -> Image.Image:
    """A square image of `tint` under noise; domain "scan" is the same picture dim and flat (a third of the
    contrast, grey-lifted), as scans and X-rays are next to photos: what shifts a BatchNorm's statistics."""
    pixels = np.asarray(tint, dtype=np.float32) * rng.uniform(0.5, 1.0) + rng.normal(0, 70, (size, size, 3))
    if domain == "scan":
        pixels = 0.35 * pixels + 60
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def tinted_imagefolder(
    root: Path,
    tints: dict[str, tuple[int, int, int]],
    *,
    train: int,
    val: int,
    size: int,
    seed: int,
    domain: str = "photo",
) -> Path:
    """root/{train,val}/<tint name>/*.jpg: `train` and `val` images per class; a finished set is reused."""
    if (root / "val").is_dir():
        return root
    rng = np.random.default_rng(seed)
    staging = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    for name, tint in tints.items():
        for i in range(train + val):
            split = "train" if i < train else "val"
            save(tinted(tint, size, rng, domain=domain), staging / split / name / f"{i:04d}.jpg")
    staging.rename(root)  # a half-written set is never mistaken for a finished one
    return root

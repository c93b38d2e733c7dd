"""Photo-like images and ImageFolders made on the spot, so every benchmark runs offline on the same kind of data."""

from __future__ import annotations

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

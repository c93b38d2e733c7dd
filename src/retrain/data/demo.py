"""Build the offline demo set: synthetic shapes in a pre-split ImageFolder, so a first run needs no download.

The class is the shape alone. Colours, background, position, size, rotation and noise are drawn at random
for every image from the same ranges in every class, so a model has to learn shape, not colour.

    retrain demo-data --root data/demo
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from retrain.errors import ConfigError, DataError

CLASSES: tuple[str, ...] = ("circle", "cross", "ring", "square", "star", "triangle")
SPLITS: tuple[str, ...] = ("train", "val", "test")
MARKER = ".retrain-demo.json"
# Bump when the drawing changes, so an old set on disk is rebuilt instead of reused.
FORMAT_VERSION = 1
DEFAULT_PER_CLASS = 150
_SPLIT_FRACTIONS = (0.7, 0.15)  # train, val; test takes the rest
_SUPERSAMPLE = 4  # draw masks large, then downsample: anti-aliased edges without extra dependencies
_JPEG_QUALITY = 90


def split_sizes(per_class: int) -> dict[str, int]:
    """Images per class in each split, so callers can predict counts without building."""
    n_train = round(per_class * _SPLIT_FRACTIONS[0])
    n_val = round(per_class * _SPLIT_FRACTIONS[1])
    return {"train": n_train, "val": n_val, "test": per_class - n_train - n_val}


def build_demo_dataset(
    root: Path,
    *,
    per_class: int = DEFAULT_PER_CLASS,
    image_size: int = 64,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Write the demo set under ``root`` (or reuse a complete one), so a first run needs no download."""
    root = Path(root)
    _check_params(per_class, image_size)
    params = _params(per_class, image_size, seed)
    if not force and _is_complete(root, params):
        return root
    if root.exists() and not _owned_by_us(root):
        raise DataError(
            f"Demo data root {root} already holds files that are not a demo set (no {MARKER} marker), "
            "and it will not be overwritten. Pass another root (--root / data.root) or remove that folder."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build next to root and rename into place: an interrupted build leaves only a hidden temp folder,
    # never a root that looks complete.
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_set(tmp, params)
        _move_into_place(tmp, root, params, force=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def read_marker(root: Path) -> dict[str, Any] | None:
    """The parameters and counts a finished build recorded, or None when ``root`` holds no demo set."""
    try:
        data = json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_params(per_class: int, image_size: int) -> None:
    if per_class < 3:
        raise ConfigError(
            f"Demo data per_class is {per_class}, but each of the train/val/test splits needs an image per "
            "class. Pass per_class >= 3 (--per-class)."
        )
    if image_size < 16:
        raise ConfigError(
            f"Demo data image_size is {image_size}, too small to tell the shapes apart. "
            "Pass image_size >= 16 (--image-size)."
        )


def _params(per_class: int, image_size: int, seed: int) -> dict[str, Any]:
    sizes = split_sizes(per_class)
    return {
        "format": FORMAT_VERSION,
        "classes": list(CLASSES),
        "per_class": per_class,
        "image_size": image_size,
        "seed": seed,
        "counts": {split: dict.fromkeys(CLASSES, sizes[split]) for split in SPLITS},
    }


def _owned_by_us(root: Path) -> bool:
    """An empty folder or one we built (even an older or damaged build) may be replaced; anything else not."""
    return (root / MARKER).is_file() or (root.is_dir() and not any(root.iterdir()))


def _is_complete(root: Path, params: dict[str, Any]) -> bool:
    """True when the marker matches ``params`` and every image it promises is on disk."""
    if read_marker(root) != params:
        return False
    for split, per_class in params["counts"].items():
        for name, n in per_class.items():
            folder = root / split / name
            if not folder.is_dir() or sum(1 for _ in folder.iterdir()) != n:
                return False
    return True


def _move_into_place(tmp: Path, root: Path, params: dict[str, Any], *, force: bool) -> None:
    """Rename ``tmp`` to ``root``; when a concurrent build got there first with the same set, keep theirs."""
    for _ in range(3):
        try:
            os.replace(tmp, root)  # succeeds when root is absent or an empty folder
            return
        except OSError:
            pass
        if not force and _is_complete(root, params):
            return  # a concurrent build won the race; its set is as good as ours
        # Our own older or damaged build (checked by the caller): move it aside, since rename cannot
        # replace a full folder, then try again.
        trash = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(root, trash)
        except FileNotFoundError:
            continue  # a concurrent build moved it already
        shutil.rmtree(trash, ignore_errors=True)
    raise DataError(
        f"Could not move the new demo set into {root}: other processes keep replacing it. "
        "Let them finish, then run the command again."
    )


def _write_set(out: Path, params: dict[str, Any]) -> None:
    """Draw and save every image, then write the marker last: the marker means 'complete'."""
    image_size, seed = params["image_size"], params["seed"]
    sizes = split_sizes(params["per_class"])
    for class_idx, name in enumerate(CLASSES):
        index = 0
        for split in SPLITS:
            folder = out / split / name
            folder.mkdir(parents=True)
            for i in range(sizes[split]):
                # One generator per image: an image depends only on (seed, class, index), not on the others.
                rng = np.random.default_rng([seed, class_idx, index])
                image = render(name, image_size, rng)
                # Every third file is PNG, so loaders are exercised on both formats in every split.
                if i % 3 == 2:
                    image.save(folder / f"{name}_{index:04d}.png")
                else:
                    image.save(folder / f"{name}_{index:04d}.jpg", quality=_JPEG_QUALITY)
                index += 1
    (out / MARKER).write_text(json.dumps(params, indent=2) + "\n")


def render(shape: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of ``shape`` with random colours, background, pose and noise, so only shape tells the class."""
    size = image_size
    bg = _background(size, rng)
    fg = _contrasting_colour(bg.reshape(-1, 3).mean(axis=0), rng)
    mask = _shape_mask(shape, size, rng)
    # Shade the shape with a mild gradient of its own, so it is not a flat colour that a colour filter finds.
    shade = 1.0 + rng.uniform(-0.25, 0.25) * _ramp(size, rng)
    shape_rgb = np.clip(fg[None, None, :] * shade[..., None], 0, 255)
    image = bg * (1.0 - mask[..., None]) + shape_rgb * mask[..., None]
    image += rng.normal(0.0, rng.uniform(1.0, 6.0), image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


def _ramp(size: int, rng: np.random.Generator) -> np.ndarray:
    """A linear ramp in [-1, 1] along a random direction."""
    angle = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:size, 0:size] / (size - 1) * 2.0 - 1.0
    return (np.cos(angle) * x + np.sin(angle) * y) / math.sqrt(2)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A two-colour gradient plus random stripes or blotches, float RGB in [0, 255]."""
    c1 = rng.uniform(0, 255, 3)
    c2 = np.clip(c1 + rng.uniform(-60, 60, 3), 0, 255)
    t = (_ramp(size, rng) + 1.0) / 2.0
    bg = c1 * (1.0 - t[..., None]) + c2 * t[..., None]
    y, x = np.mgrid[0:size, 0:size] / size
    kind = rng.integers(3)
    if kind == 1:  # stripes of random frequency and angle
        angle = rng.uniform(0, math.pi)
        freq = rng.uniform(3, 10)
        texture = np.sin(2 * math.pi * freq * (np.cos(angle) * x + np.sin(angle) * y) + rng.uniform(0, 6.3))
        bg += rng.uniform(5, 15) * texture[..., None]
    elif kind == 2:  # smooth blotches: a coarse random grid, upsampled
        coarse = rng.normal(0, 1, (5, 5)).astype(np.float32)
        blot = np.asarray(Image.fromarray(coarse, "F").resize((size, size), Image.Resampling.BICUBIC))
        bg += rng.uniform(5, 15) * blot[..., None] / max(float(np.abs(blot).max()), 1e-6)
    return np.clip(bg, 0, 255)


def _contrasting_colour(background: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random colour far enough from the mean background that the shape stays visible."""
    for _ in range(100):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - background) > 110:
            return colour
    return 255.0 - background  # the inverse is always far away


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Coverage in [0, 1] of ``shape`` at a random centre, radius and rotation."""
    big = size * _SUPERSAMPLE
    radius = rng.uniform(0.3, 0.44) * big
    margin = radius * 0.8  # shapes may touch the border a little, as real objects do
    cx, cy = rng.uniform(margin, big - margin, 2)
    rot = rng.uniform(0, 2 * math.pi)
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)

    def polygon(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        cos, sin = math.cos(rot), math.sin(rot)
        return [(cx + radius * (px * cos - py * sin), cy + radius * (px * sin + py * cos)) for px, py in points]

    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    elif shape == "ring":
        inner = radius * rng.uniform(0.5, 0.72)
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "square":
        h = 1 / math.sqrt(2)  # corners on the unit circle
        draw.polygon(polygon([(-h, -h), (h, -h), (h, h), (-h, h)]), fill=255)
    elif shape == "triangle":
        draw.polygon(polygon(_regular(3, 1.0)), fill=255)
    elif shape == "star":
        inner_ratio = rng.uniform(0.38, 0.5)
        tips, valleys = _regular(5, 1.0), _regular(5, inner_ratio, offset=math.pi / 5)
        draw.polygon(polygon([p for pair in zip(tips, valleys, strict=True) for p in pair]), fill=255)
    elif shape == "cross":
        w = rng.uniform(0.22, 0.34)  # half the arm width, as a fraction of the radius
        a = math.sqrt(1 - w * w)  # arm corners on the unit circle
        outline = [(-a, -w), (-w, -w), (-w, -a), (w, -a), (w, -w), (a, -w)]
        outline += [(-x, -y) for x, y in outline]  # the other half is the first rotated by 180 degrees
        draw.polygon(polygon(outline), fill=255)
    else:
        raise ConfigError(f"Unknown demo shape {shape!r}; expected one of {', '.join(CLASSES)}.")
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def _regular(n: int, r: float, offset: float = 0.0) -> list[tuple[float, float]]:
    """Vertices of a regular ``n``-gon of circumradius ``r``, the first pointing up."""
    angles = [offset - math.pi / 2 + 2 * math.pi * k / n for k in range(n)]
    return [(r * math.cos(a), r * math.sin(a)) for a in angles]


if __name__ == "__main__":  # legacy form of the retrain command
    import sys

    from retrain.cli.main import legacy_entry

    sys.exit(legacy_entry("demo-data"))

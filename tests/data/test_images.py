"""open_rgb reads every mode as the right RGB picture, fast for big JPEGs; inspect_image names bad files."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _synthetic import photo
from PIL import Image

from retrain.data.images import (
    CORRUPT,
    DECOMPRESSION_BOMB,
    EMPTY,
    NOT_AN_IMAGE,
    TRUNCATED,
    UNOPENABLE,
    UNSUPPORTED,
    inspect_image,
    open_rgb,
)
from retrain.data.transforms import eval_transforms, preprocessing

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
ORIENTATION = 0x0112


def halves(mode: str, left: Any, right: Any, size: tuple[int, int] = (8, 4)) -> Image.Image:
    """An image whose left half is one value and right half another."""
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


def left_right(img: Image.Image) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return img.getpixel((0, 0)), img.getpixel((img.width - 1, img.height - 1))


def save_jpeg_with_orientation(path: Path, img: Image.Image, orientation: int) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())


def p_with_transparency() -> Image.Image:
    img = halves("P", 0, 1)
    img.putpalette([0, 0, 0, *RED])
    return with_transparent_colour(img, 0)


def with_transparent_colour(img: Image.Image, colour: Any) -> Image.Image:
    img.info["transparency"] = colour  # written as the PNG tRNS chunk
    return img


def sixteen_bit(value: int) -> Image.Image:
    return Image.fromarray(np.array([[65535, value]], dtype=np.uint16).repeat(4, axis=0).repeat(4, axis=1))


# (file name, image, the mode Pillow reads it back in, expected left pixel, expected right pixel)
UNUSUAL = [
    ("gray.png", halves("L", 100, 30), "L", (100, 100, 100), (30, 30, 30)),
    ("bilevel.png", halves("1", 1, 0), "1", WHITE, (0, 0, 0)),
    ("gray_alpha.png", halves("LA", (50, 0), (50, 255)), "LA", WHITE, (50, 50, 50)),
    ("rgba.png", halves("RGBA", (0, 0, 0, 0), (*RED, 128)), "RGBA", WHITE, (255, 127, 127)),
    ("palette_transparent.png", p_with_transparency(), "P", WHITE, RED),
    (
        "rgb_transparent.png",
        with_transparent_colour(halves("RGB", (0, 0, 0), RED), (0, 0, 0)),
        "RGB",
        WHITE,
        RED,
    ),
    ("cmyk.jpg", halves("CMYK", (0, 255, 255, 0), (255, 255, 0, 0)), "CMYK", RED, BLUE),
    # 16 bits: 65535 is white and 25700 = 100 * 257 is grey 100 (Pillow's own conversion clips it to 255).
    ("sixteen_bit.png", sixteen_bit(25700), "I;16", WHITE, (100, 100, 100)),
    ("sixteen_bit.pgm", sixteen_bit(25700), "I", WHITE, (100, 100, 100)),
    ("float.tif", halves("F", 1.0, 0.5), "F", WHITE, (128, 128, 128)),
]


@pytest.mark.parametrize(("name", "img", "mode", "left", "right"), UNUSUAL, ids=[u[0] for u in UNUSUAL])
def test_unusual_modes_load_as_rgb_with_the_right_colours(
    tmp_path: Path, name: str, img: Image.Image, mode: str, left: tuple[int, ...], right: tuple[int, ...]
) -> None:
    path = tmp_path / name
    img.save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode
    loaded = open_rgb(path)
    assert loaded.mode == "RGB"
    assert loaded.size == img.size
    tolerance = 12 if name.endswith(".jpg") else 1
    for got, want in zip(left_right(loaded), (left, right), strict=True):
        assert np.abs(np.subtract(got, want)).max() <= tolerance, (got, want)
    assert inspect_image(path, full=True) is None


def test_exif_orientation_6_turns_the_image_upright(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    save_jpeg_with_orientation(path, halves("RGB", RED, BLUE, size=(60, 40)), orientation=6)
    loaded = open_rgb(path)
    # Orientation 6: the stored image is shown turned 90 degrees clockwise, so its left half ends up on top.
    assert loaded.size == (40, 60)
    top, bottom = np.asarray(loaded)[5, 20], np.asarray(loaded)[-5, 20]
    assert np.abs(top - np.array(RED)).max() < 12 and np.abs(bottom - np.array(BLUE)).max() < 12


def test_draft_keeps_the_shorter_side_after_the_exif_rotation(tmp_path: Path) -> None:
    path = tmp_path / "big_rotated.jpg"
    save_jpeg_with_orientation(path, halves("RGB", RED, BLUE, size=(1600, 1200)), orientation=6)
    loaded = open_rgb(path, min_size=110)
    # Decoded at 1/4 scale (1/8 would leave the shorter side below DRAFT_MARGIN * min_size), then turned upright.
    assert loaded.size == (300, 400)
    assert np.abs(np.asarray(loaded)[10, 150] - np.array(RED)).max() < 12


def test_small_images_take_the_plain_path(tmp_path: Path) -> None:
    path = tmp_path / "small.jpg"
    photo(500, 375).save(path, quality=90)
    with Image.open(path) as img:
        reference = img.convert("RGB")
    assert open_rgb(path, min_size=256).tobytes() == reference.tobytes()


@pytest.mark.parametrize("size", [(4000, 3000), (500, 375)])
def test_fast_decode_matches_the_reference_through_the_eval_pipeline(tmp_path: Path, size: tuple[int, int]) -> None:
    path = tmp_path / "photo.jpg"
    photo(*size).save(path, quality=90)
    pre = preprocessing(224)
    transform = eval_transforms(pre)
    with Image.open(path) as img:
        reference = transform(img.convert("RGB"))
    fast = transform(open_rgb(path, min_size=pre.resize))
    # In [0, 1] pixel units. Measured: 4000x3000 (1/8 scale) mean 0.0027, max 0.031; 500x375 decodes identically.
    diff = (fast - reference).abs() * torch.tensor(pre.std).view(3, 1, 1)
    assert diff.mean() < 0.005
    assert diff.max() < 0.05


def png_header(path: Path, width: int, height: int) -> None:
    """A PNG that only claims its size: the cheap decompression bomb."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    photo(*size).save(buffer, "JPEG")
    return buffer.getvalue()


def make(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_each_problem_kind_is_named(tmp_path: Path) -> None:
    jpeg = jpeg_bytes()
    png = tmp_path / "ok.png"
    photo(64, 48).save(png)
    heic = b"\x00\x00\x00\x18ftypheic" + bytes(64)
    cases = {
        make(tmp_path, "empty.jpg", b""): EMPTY,
        make(tmp_path, "notes.jpg", b"just some text\n"): NOT_AN_IMAGE,
        make(tmp_path, "page.png", b"<!DOCTYPE html><html></html>"): NOT_AN_IMAGE,
        make(tmp_path, "cut.jpg", jpeg[: len(jpeg) * 2 // 3]): TRUNCATED,
        make(tmp_path, "cut.png", png.read_bytes()[:-40]): TRUNCATED,
        make(tmp_path, "bad_header.jpg", jpeg[:3] + bytes(range(200))): CORRUPT,
        make(tmp_path, "iphone.jpg", heic): UNSUPPORTED,
    }
    dangling = tmp_path / "gone.jpg"
    dangling.symlink_to(tmp_path / "missing.jpg")
    cases[dangling] = UNOPENABLE
    bomb = tmp_path / "bomb.png"
    png_header(bomb, 100_000, 100_000)
    cases[bomb] = DECOMPRESSION_BOMB
    limit = Image.MAX_IMAGE_PIXELS
    for path, kind in cases.items():
        assert (inspect_image(path, full=False), inspect_image(path, full=True)) == (kind, kind), path.name
    assert limit == Image.MAX_IMAGE_PIXELS


def test_quick_mode_trusts_headers_and_full_mode_decodes(tmp_path: Path) -> None:
    bmp = tmp_path / "ok.bmp"
    photo(64, 48).save(bmp)
    cut_bmp = make(tmp_path, "cut.bmp", bmp.read_bytes()[:-500])
    assert inspect_image(cut_bmp, full=False) is None
    assert inspect_image(cut_bmp, full=True) == TRUNCATED
    # Bytes after the end marker (camera trailers) make a JPEG look cut off; the decode clears it.
    trailer = make(tmp_path, "trailer.jpg", jpeg_bytes() + b"vendor data")
    assert inspect_image(trailer, full=False) is None


def test_an_image_just_over_the_pixel_limit_is_a_bomb_without_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 40)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: PIL warns (over 1x), does not raise
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert inspect_image(path, full=False) == DECOMPRESSION_BOMB

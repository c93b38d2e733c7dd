"""Read any image as the RGB picture a viewer shows, fast for big JPEGs; say what is wrong with bad ones.

Decisions:
- Transparency (RGBA, LA, PA, P or L/RGB with a tRNS colour) is composited over white, the background that
  viewers and web pages show; dropping alpha would expose whatever colour transparent pixels store (often
  black).
- 16-bit data ("I;16*", and "I", which is how Pillow reads 16-bit PPM/PGM) is scaled by 255/65535, so 65535
  becomes 255, where Pillow's own conversion clips everything above 255 to white. Float ("F") images in [0, 1]
  are scaled by 255; other floats are clipped to [0, 255] as Pillow does.
- CMYK uses Pillow's conversion, as torchvision's default loader does (embedded ICC profiles are not applied).
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

IMAGE_EXTENSIONS: tuple[str, ...] = IMG_EXTENSIONS

# Image-level problem kinds: a file with one of them must be left out of training.
EMPTY = "empty"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
UNSUPPORTED = "unsupported"
UNOPENABLE = "unopenable"
DECOMPRESSION_BOMB = "decompression_bomb"
IMAGE_PROBLEM_KINDS = (EMPTY, NOT_AN_IMAGE, TRUNCATED, CORRUPT, UNSUPPORTED, UNOPENABLE, DECOMPRESSION_BOMB)

BACKGROUND = (255, 255, 255)

# JPEG draft decoding keeps the shorter side >= 1.4x what the transforms need. Measured on a 4000x3000 photo
# (2.7 MB, quality 90) through Resize(256)/CenterCrop(224), against a full decode, in [0, 1] pixel units:
# margin 1.46 (1/8 scale) mean 0.0023, max 0.031; margin 2.9 (1/4) mean 0.0010, max 0.012; margin 0.75 mean
# 0.0067, max 0.086. Time per image on one core: full decode 56 ms, 1/4 scale 26 ms, 1/8 scale 23 ms. Below
# that the decoder cannot go: entropy decoding reads every coefficient at any scale.
DRAFT_MARGIN = 1.4
# Random crops resample anyway, so training only needs its smallest crop never to be upsampled: on that
# 4000x3000 photo this lets light augmentation decode at 1/8 scale (the smallest crop still has 290 px) instead
# of 1/4, 26 -> 23 ms per image.
RANDOM_CROP_DRAFT_MARGIN = 1.0

# Leading bytes of the formats Pillow reads: an unreadable file that starts like one is corrupt,
# anything else is not an image at all.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")
_NETPBM = tuple(f"P{i}".encode() for i in range(1, 8))


def has_image_extension(path: str | Path) -> bool:
    """Whether ImageFolder would pick this file up, by the same extension list."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def open_rgb(path: str | Path | bytes, min_size: int | None = None, margin: float = DRAFT_MARGIN) -> Image.Image:
    """Load an upright 8-bit RGB image, decoding big JPEGs at 1/2, 1/4 or 1/8 scale when `min_size` allows it.

    `path` may also be the file's bytes (an upload to the server), decoded exactly as the file would be.
    `min_size` is the shorter side the transforms need (the eval resize, or the smallest random crop). The
    decoder shrinks only while the shorter side stays >= margin * min_size, so the antialiased resize
    after it still reduces the image. See DRAFT_MARGIN for what that costs in pixels and gains in time.
    """
    with _binary(path) as f:
        img = Image.open(f)
        if min_size is not None:
            request = math.ceil(margin * min_size)
            if min(img.size) >= 2 * request:  # smaller ones would decode at full scale: leave them alone
                # A square request bounds both sides, so the shorter side keeps its bound whichever way the
                # EXIF orientation later turns the image. Formats other than JPEG ignore draft().
                img.draft("RGB", (request, request))
        ImageOps.exif_transpose(img, in_place=True)
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB as the module docstring decides, so no mode turns into garbage."""
    if img.mode == "RGB" and not img.has_transparency_data:
        return img
    if img.mode == "F" or img.mode.startswith("I"):
        img = _high_depth_to_l(img)
    if img.has_transparency_data:
        canvas = Image.new("RGBA", img.size, (*BACKGROUND, 255))
        canvas.alpha_composite(img.convert("RGBA"))
        return canvas.convert("RGB")
    return img.convert("RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    values = np.nan_to_num(np.asarray(img, dtype=np.float64))
    if img.mode != "F":
        values = np.clip(values, 0, 65535) / 257.0
    elif values.size and values.min() >= 0 and values.max() <= 1:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def inspect_image(path: str | Path, full: bool) -> str | None:
    """The problem kind that would stop training on this file, or None; `full` decodes the pixels too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        problem = check_image(path, full=full)
    return problem[0] if problem else None


def check_image(path: str | Path | bytes, *, full: bool) -> tuple[str, str] | None:
    """(kind, detail) for a file (or a file's bytes) that training could not read, or None; the detail says what failed.

    Bombs are found by their size against Image.MAX_IMAGE_PIXELS, which is never raised. Pillow's
    DecompressionBombWarning is left alone: warning filters are process-wide, so a caller running this in
    threads silences that warning once, around the pool.
    """
    if isinstance(path, bytes):
        return _check_stream(io.BytesIO(path), full) if path else (EMPTY, "it is 0 bytes")
    try:
        if Path(path).stat().st_size == 0:
            return EMPTY, "the file is 0 bytes"
        with open(path, "rb") as f:
            return _check_stream(f, full)
    except OSError as e:  # from the OS (permissions, dangling link); Pillow's errors are handled inside
        return UNOPENABLE, f"{type(e).__name__}: {e.strerror or e}"


def _check_stream(f: BinaryIO, full: bool) -> tuple[str, str] | None:
    head = f.read(16)
    f.seek(0)
    try:
        with Image.open(f) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and img.width * img.height > limit:
                return DECOMPRESSION_BOMB, f"{img.width}x{img.height} pixels is over PIL's limit of {limit}"
            is_jpeg = img.format == "JPEG"
            img.verify()  # PNG: chunk CRCs and completeness; most other formats: nothing beyond the header
        # A JPEG that does not end with the EOI marker is most likely cut off; decoding it settles that.
        if full or (is_jpeg and not _ends_with_jpeg_eoi(f)):
            f.seek(0)
            with Image.open(f) as img:
                # JPEG at 1/8 scale: entropy decoding, where truncation and corruption show, still reads
                # every byte; only the inverse DCT shrinks, which halves the time of a full check.
                img.draft(None, (1, 1))
                # The rest of open_rgb too, so a full check passes exactly the files training can read.
                ImageOps.exif_transpose(img, in_place=True)
                to_rgb(img)
    except Image.DecompressionBombError as e:
        return DECOMPRESSION_BOMB, str(e)
    except UnidentifiedImageError:
        return _classify_unidentified(head)
    except Exception as e:  # Pillow raises OSError, SyntaxError, EOFError, ValueError, struct.error...
        kind = TRUNCATED if isinstance(e, EOFError) or "truncated" in str(e).lower() else CORRUPT
        return kind, f"{type(e).__name__}: {e}"
    return None


def _binary(path: str | Path | bytes) -> BinaryIO:
    return io.BytesIO(path) if isinstance(path, bytes) else open(path, "rb")


def _ends_with_jpeg_eoi(f: BinaryIO) -> bool:
    f.seek(-2, 2)
    return f.read(2) == b"\xff\xd9"


def _classify_unidentified(head: bytes) -> tuple[str, str]:
    if head[4:8] == b"ftyp":
        return UNSUPPORTED, "an ISO media file (e.g. HEIC) that Pillow cannot read; convert it to JPEG or PNG"
    if head.startswith(_SIGNATURES) or (head.startswith(_NETPBM) and head[2:3].isspace()):
        return CORRUPT, f"starts like an image ({head[:8]!r}) but Pillow cannot identify it"
    return NOT_AN_IMAGE, f"not an image file; it starts with {head!r}"

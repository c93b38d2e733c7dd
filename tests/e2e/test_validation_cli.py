"""A messy image folder, as users have them: the scan reports it, `skip` trains without the bad files, `error` stops.

The folder holds one file of every bad kind, hidden files and folders, a duplicate across train and val, and
unusual but valid images (grayscale, alpha, palette transparency, CMYK, 16-bit, EXIF-rotated), which must be
converted and trained on, not dropped. A second folder has empty classes, which no policy can skip.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from clitools import FAST, make_imagefolder, run_cli
from PIL import Image

pytestmark = pytest.mark.e2e

BAD = {  # file name in train/cat -> the kind the report gives it
    "empty.jpg": "empty",
    "notes.jpg": "not_an_image",
    "cut.jpg": "truncated",
    "bad_header.png": "corrupt",
    "iphone.jpg": "unsupported",
    "gone.jpg": "unopenable",
    "bomb.png": "decompression_bomb",
}
UNUSUAL = ("gray.png", "gray_alpha.png", "rgba.png", "palette_transparent.png", "cmyk.jpg", "deep16.png", "exif.jpg")


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def write_bad_files(folder: Path) -> None:
    """One file of each kind that no loader can read."""
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a picture\n")
    (folder / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "bad_header.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (folder / "iphone.jpg").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    (folder / "gone.jpg").symlink_to(folder / "deleted.jpg")
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # claims 10^10 pixels, holds none
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b""))


def write_unusual_images(folder: Path) -> None:
    """Valid images in the modes and orientations that naive loaders turn into garbage or errors."""
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("LA").save(folder / "gray_alpha.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette_transparent.png", transparency=0)
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65536, (40, 40), dtype=np.uint16)).save(folder / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° when shown
    rgb.crop((0, 0, 40, 30)).save(folder / "exif.jpg", exif=exif)


@dataclass
class Job:
    """One job of the sweep: its results.json and its folder."""

    results: dict
    dir: Path


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_imagefolder(tmp_path_factory.mktemp("messy") / "images")
    cat = root / "train" / "cat"
    write_bad_files(cat)
    write_unusual_images(cat)
    (cat / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "dog" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "dog" / ".ipynb_checkpoints" / "000-checkpoint.jpg").write_bytes(b"")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._images").write_bytes(b"\0")
    shutil.copy(root / "train" / "dog" / "001.jpg", root / "val" / "dog" / "leaked.jpg")
    return root


@pytest.fixture(scope="module")
def empty_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_imagefolder(tmp_path_factory.mktemp("holes") / "images", per_class=2)
    for split in ("train", "val", "test"):
        (root / split / "bird").mkdir()
    return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, messy: Path, empty_classes: Path) -> dict[tuple[str, str], Job]:
    """Both folders under both policies, as one multirun (one process); results.json of each job by (folder, policy)."""
    cwd = tmp_path_factory.mktemp("validation_work")
    result = run_cli(
        "train.py",
        "-m",
        f"data.root={messy},{empty_classes}",
        "data.on_bad_file=skip,error",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "~callbacks.report",
        *FAST,
        cwd=cwd,
    )
    assert result.returncode == 0, result.output[-4000:]
    jobs = {}
    for results in (cwd / "logs" / "train" / "multiruns").rglob("results.json"):
        overrides = yaml.safe_load((results.parent / ".hydra" / "overrides.yaml").read_text())
        chosen = dict(o.split("=", 1) for o in overrides if o.startswith(("data.root=", "data.on_bad_file=")))
        folder = "messy" if chosen["data.root"] == str(messy) else "empty_classes"
        jobs[folder, chosen["data.on_bad_file"]] = Job(json.loads(results.read_text()), results.parent)
    assert len(jobs) == 4, sorted(jobs)
    return jobs


def test_the_scan_reports_every_kind_with_its_path(messy: Path) -> None:
    command = [sys.executable, "-m", "retrain.data.validate", str(messy)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr  # bad files: training with the default policy would stop
    report = result.stdout
    for kind in BAD.values():
        assert any(line.split() == [kind, "1"] for line in report.splitlines()), f"{kind} count\n{report}"
    for line in (["hidden", "3"], ["leakage", "1"]):
        assert line in [row.split() for row in report.splitlines()], report
    for name in BAD:
        assert f"train/cat/{name}:" in report, name
    assert "val/dog/leaked.jpg: same bytes as train/dog/001.jpg" in report
    for name in (".DS_Store", ".ipynb_checkpoints", "__MACOSX"):
        assert name in report
    for name in UNUSUAL:
        assert name not in report  # valid images are no problem


def test_skip_trains_without_exactly_the_bad_files(sweep, messy: Path) -> None:
    job = sweep["messy", "skip"]
    assert job.results["status"] == "ok"
    assert job.results["bad_files"] == len(BAD)
    listed = (job.dir / "bad_files.txt").read_text().split()
    assert sorted(listed) == sorted(str(messy / "train" / "cat" / name) for name in BAD)
    split = json.loads((job.dir / "split.json").read_text())
    trained = {path for path, _ in split["samples"]["train"]}  # relative to the data folder
    cat = {Path(path).name for path in trained if path.startswith("train/cat/")}
    assert set(UNUSUAL) <= cat  # converted, not dropped
    assert not cat & set(BAD)
    assert len(trained) == 3 * 8 + len(UNUSUAL)


def test_error_stops_before_training_with_every_bad_file_listed(sweep) -> None:
    job = sweep["messy", "error"]
    assert job.results["status"] == "failed"
    error = job.results["error"]
    assert error.startswith("DataError: 7 image files under")
    for name in BAD:
        assert f"train/cat/{name}" in error
    assert "data.on_bad_file=skip" in error
    assert not (job.dir / "checkpoints").exists()


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_empty_classes_stop_training_under_either_policy(sweep, empty_classes: Path, policy: str) -> None:
    job = sweep["empty_classes", policy]
    assert job.results["status"] == "failed"
    error = job.results["error"]
    assert "3 class or split problems that data.on_bad_file cannot skip" in error
    for split in ("train", "val", "test"):
        assert str(empty_classes / split / "bird") in error
    assert not (job.dir / "checkpoints").exists()

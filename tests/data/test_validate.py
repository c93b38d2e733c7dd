"""scan() finds every problem kind in both layouts, counts them exactly; the CLI exits with the right code."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrain.cli.main import main as retrain_cli
from retrain.data.validate import ALL, raise_for_bad_files, scan
from retrain.errors import ConfigError, DataError


def image_bytes(fmt: str = "JPEG", seed: int = 0, size: tuple[int, int] = (32, 24)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def write(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def bomb_png(path: Path) -> Path:
    """A PNG whose header claims 100000x100000 pixels and holds none."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return write(path, b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def good_dataset(root: Path) -> Path:
    """A clean split layout: two classes, distinct images in train, val and test."""
    seed = 0
    for split in ("train", "val", "test"):
        for name in ("cat", "dog"):
            for i in range(2):
                seed += 1
                write(root / split / name / f"{i}.jpg", image_bytes(seed=seed))
    return root


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    """A split layout with one file or folder of every problem kind, next to good images."""
    root = good_dataset(tmp_path / "messy")
    cat = root / "train" / "cat"
    jpeg = image_bytes(seed=99)
    write(cat / "empty.jpg")
    write(cat / "notes.jpg", b"not a picture\n")
    write(cat / "cut.jpg", jpeg[: len(jpeg) // 2])
    write(cat / "bad_header.png", b"\x89PNG\r\n\x1a\n" + bytes(100))
    write(cat / "iphone.jpg", b"\x00\x00\x00\x18ftypheic" + bytes(64))
    (cat / "gone.jpg").symlink_to(root / "nowhere.jpg")
    bomb_png(cat / "bomb.png")
    write(cat / "labels.csv", b"a,b\n")  # ignored: no image extension
    write(cat / ".DS_Store", b"\0")  # hidden
    write(cat / "._0.jpg", b"\0\0")  # hidden: AppleDouble resource fork, not an image
    write(root / "train" / ".ipynb_checkpoints" / "x.jpg", b"")  # hidden folder, never read
    write(root / "__MACOSX" / "train" / "cat" / "._1.jpg", b"")  # hidden folder at the top
    write(root / "README.txt", b"about the data")  # ignored: not a split folder
    (root / "train" / "bird").mkdir()  # empty class, and missing from val and test
    write(root / "test" / "fish" / "0.jpg", image_bytes(seed=77))  # a class that train does not have
    write(root / "val" / "dog" / "copy.jpg", (root / "train" / "dog" / "0.jpg").read_bytes())  # leakage
    return root


MESSY_COUNTS = {
    "empty": 1,
    "not_an_image": 1,
    "truncated": 1,
    "corrupt": 1,
    "unsupported": 1,
    "unopenable": 1,
    "decompression_bomb": 1,
    "missing_class": 3,
    "empty_class": 1,
    "leakage": 1,
    "hidden": 4,
    "ignored": 2,
}


def test_messy_split_layout_reports_every_kind_exactly(messy: Path) -> None:
    report = scan(messy)
    assert report.layout == "split"
    assert report.counts() == MESSY_COUNTS
    cat = messy / "train" / "cat"
    bad = ["bad_header.png", "bomb.png", "cut.jpg", "empty.jpg", "gone.jpg", "iphone.jpg", "notes.jpg"]
    assert report.bad_files() == [cat / name for name in bad]
    assert report.class_names == {
        "train": ["bird", "cat", "dog"],
        "val": ["cat", "dog"],
        "test": ["cat", "dog", "fish"],
    }
    assert report.n_files == 12 + 7 + 2  # good images, bad ones, fish and the copy
    by_kind = {p.kind: p for p in report.problems}
    assert by_kind["leakage"].path == messy / "val" / "dog" / "copy.jpg"
    assert "train/dog/0.jpg" in by_kind["leakage"].detail
    missing = {(p.path, p.detail) for p in report.problems if p.kind == "missing_class"}
    where = {path.relative_to(messy).as_posix() for path, _ in missing}
    assert where == {"val/bird", "test/bird", "train/fish"}
    assert report.has_errors()


def test_full_mode_decodes_what_quick_mode_trusts(tmp_path: Path) -> None:
    root = good_dataset(tmp_path / "data")
    bmp = image_bytes("BMP", seed=5)
    cut = write(root / "train" / "cat" / "cut.bmp", bmp[:-300])  # header intact, pixel rows missing
    assert not scan(root, mode="quick").has_errors()
    full = scan(root, mode="full")
    assert full.counts() == {"truncated": 1}
    assert full.bad_files() == [cut]


def test_clean_folder_layout_has_no_problems_and_no_leakage_check(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    same = image_bytes(seed=1)
    write(root / "cat" / "a.jpg", same)
    write(root / "dog" / "a.jpg", same)  # identical files across classes are not split leakage
    write(root / ".DS_Store", b"\0")
    report = scan(root, mode="full")
    assert report.layout == "folder"
    assert report.class_names == {ALL: ["cat", "dog"]}
    assert report.counts() == {"hidden": 1}
    assert not report.has_errors()


def test_split_layout_without_val_and_split_without_classes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write(root / "train" / "cat" / "a.jpg", image_bytes())
    write(root / "test" / "stray.jpg", image_bytes(seed=2))
    report = scan(root)
    assert report.counts() == {"no_classes": 1, "missing_split": 1, "missing_class": 1, "ignored": 1}
    kinds = {p.kind: p.path.relative_to(root).as_posix() for p in report.problems}
    assert kinds == {
        "no_classes": "test",
        "missing_split": "val",
        "missing_class": "test/cat",
        "ignored": "test/stray.jpg",
    }


def test_format_lists_counts_then_relative_paths_capped(messy: Path) -> None:
    text = scan(messy).format(max_rows=2)
    assert "split layout, classes: train 3, val 2, test 3; 21 image files checked (quick mode)" in text
    assert "  missing_class       3" in text
    assert "\n  train/cat/cut.jpg: OSError: " in text
    assert "  ... and 2 more" in text  # hidden: 4 found, 2 shown
    assert text.index("Errors") < text.index("Warnings") < text.index("Notes") < text.index("empty (1):")


def test_raise_for_bad_files_lists_them_in_one_message(messy: Path) -> None:
    with pytest.raises(DataError) as caught:
        raise_for_bad_files(scan(messy), max_shown=2)
    message = str(caught.value)
    assert message.startswith("7 image files under")
    assert "train/cat/bad_header.png, train/cat/bomb.png and 5 more" in message
    assert "1 truncated" in message and "data.on_bad_file=skip" in message and "\n" not in message
    raise_for_bad_files(scan(good_dataset(messy.parent / "clean")))  # nothing bad: returns


def test_scan_rejects_a_missing_folder_and_an_unknown_mode(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        scan(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"data\.validate='fast'"):
        scan(tmp_path, mode="fast")


def test_cli_exit_codes(messy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert retrain_cli(["validate", str(good_dataset(tmp_path / "clean"))]) == 0
    assert "OK" in capsys.readouterr().out
    assert retrain_cli(["validate", str(messy), "--full"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert retrain_cli(["validate", str(tmp_path / "nope")]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: The data folder") and "Traceback" not in captured.err


def test_cli_as_a_module(messy: Path) -> None:
    command = [sys.executable, "-m", "retrain.data.validate", str(messy)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert "decompression_bomb" in done.stdout


def test_links_duplicates_and_skipped_images_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "flat"
    for label, name in enumerate(("cat", "dog")):
        for i in range(3):
            write(root / name / f"{i}.jpg", image_bytes(seed=10 * label + i, size=(48, 36) if i == 2 else (32, 24)))
    os.symlink("..", root / "cat" / "loop")  # walked before: every class again, into cat, round and round
    os.symlink("cat", root / "kitten")  # a second label for the same images
    os.symlink("0.jpg", root / "dog" / "again.jpg")
    write(root / "dog" / "twin.jpg", (root / "dog" / "1.jpg").read_bytes())
    write(root / "cat" / "anim.gif", image_bytes("GIF"))
    report = scan(root)
    assert report.counts() == {
        "linked_class": 1,
        "duplicate": 1,
        "symlink_loop": 1,
        "linked_file": 1,
        "skipped_image": 1,
    }
    assert report.n_files == 7 and report.has_errors()
    assert report.size_range == ((32, 24), (48, 36))
    assert retrain_cli(["validate", str(root)]) == 1
    out = capsys.readouterr().out
    for line in (
        "image sizes 32x24 to 48x36 px (from the headers)",
        "  kitten: a link to cat: its images would count twice",
        "  dog/twin.jpg: the same bytes as dog/1.jpg; the automatic split keeps them together",
        "  cat/loop: a link to the data folder; not followed",
        "  dog/again.jpg: the same file as dog/0.jpg; counted once",
        "  cat/anim.gif: a .gif image, which the loader skips; it reads .jpg, .jpeg, .png",
        "FAIL",
    ):
        assert line in out

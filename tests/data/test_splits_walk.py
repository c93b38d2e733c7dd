"""discover() reads real paths once: links that loop or copy a class never add images, identical files share a split."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path

import pytest
from clitools import make_imagefolder

from retrain.data.splits import HEAD_BYTES, LINKED_FILE, SYMLINK_LOOP, discover, identical_groups
from retrain.errors import DataError

PER_CLASS = 4  # make_imagefolder's folder layout writes twice this many images per class


def totals(root: Path) -> dict[str, int]:
    """Images per class over all splits, as training would see them."""
    counts: dict[str, int] = {}
    for per_class in discover(root).class_counts().values():
        for name, n in per_class.items():
            counts[name] = counts.get(name, 0) + n
    return counts


def found(root: Path, kind: str) -> list[str]:
    return sorted(p.path.relative_to(root).as_posix() for p in discover(root).found if p.kind == kind)


def test_a_symlink_loop_inside_a_class_adds_no_images(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "flat", layout="folder", per_class=PER_CLASS)
    os.symlink("..", root / "cat" / "loop")  # the data folder: every class, and the loop again
    os.symlink(".", root / "dog" / "self")
    os.symlink("../fox", root / "dog" / "foxes")  # another class's folder
    assert totals(root) == {"cat": 8, "dog": 8, "fox": 8}  # was 774 for cat
    assert found(root, SYMLINK_LOOP) == ["cat/loop", "dog/foxes", "dog/self"]
    split = make_imagefolder(tmp_path / "split", per_class=PER_CLASS)
    os.symlink("../..", split / "train" / "cat" / "loop")
    os.symlink("../../val", split / "test" / "dog" / "val")
    assert discover(split).class_counts() == discover(make_imagefolder(tmp_path / "plain", per_class=4)).class_counts()
    assert found(split, SYMLINK_LOOP) == ["test/dog/val", "train/cat/loop"]


def test_a_class_folder_linked_to_another_class_stops_with_both_names(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "flat", layout="folder", per_class=PER_CLASS)
    os.symlink("cat", root / "aardvark")  # sorts before cat: the link, not cat, is the one named
    with pytest.raises(DataError, match=r"aardvark is a link to cat: .*Fix: remove the link") as caught:
        discover(root)
    assert "\n" not in str(caught.value)
    split = make_imagefolder(tmp_path / "split", per_class=PER_CLASS)
    shutil.rmtree(split / "val" / "dog")
    os.symlink("cat", split / "val" / "dog")
    with pytest.raises(DataError, match=r"val/dog is a link to val/cat"):
        discover(split)


def test_a_file_linked_twice_is_counted_once_and_outside_links_still_work(tmp_path: Path) -> None:
    outside = make_imagefolder(tmp_path / "elsewhere", layout="folder", per_class=PER_CLASS)
    root = tmp_path / "data"
    root.mkdir()
    for name in ("cat", "dog"):
        os.symlink(outside / name, root / name)  # class folders kept elsewhere: an ordinary, valid layout
    os.symlink("000.png", outside / "cat" / "again.png")
    os.link(outside / "cat" / "001.jpg", outside / "cat" / "hard.jpg")
    assert totals(root) == {"cat": 8, "dog": 8}
    assert found(root, LINKED_FILE) == ["cat/again.png", "cat/hard.jpg"]


def old_split(root: Path, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """The automatic split as it was before identical files were grouped: shuffle each class, then cut."""
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    rng = random.Random(seed)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        items = sorted(str(p) for p in folder.iterdir())
        rng.shuffle(items)
        n_val, n_test = round(len(items) * val_fraction), round(len(items) * test_fraction)
        out["val"] += items[:n_val]
        out["test"] += items[n_val : n_val + n_test]
        out["train"] += items[n_val + n_test :]
    return out


def test_identical_files_stay_in_one_split_and_other_splits_do_not_change(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "flat", layout="folder", per_class=10)  # 20 images per class
    for seed in range(3):
        splits = discover(root, val_fraction=0.2, test_fraction=0.2, seed=seed)
        paths = {s: [p for p, _ in items] for s, items in splits.samples.items()}
        assert paths == old_split(root, 0.2, 0.2, seed)  # no duplicates: the same split as ever
    cat = root / "cat"
    for i in range(5):  # 5 of the 20 cats get a byte-identical twin
        shutil.copyfile(cat / f"{i:03d}.{'png' if i % 3 == 0 else 'jpg'}", cat / f"twin{i}.jpg")
    for seed in range(5):
        splits = discover(root, val_fraction=0.2, test_fraction=0.2, seed=seed)
        split_of = {path: split for split, items in splits.samples.items() for path, _ in items}
        by_bytes: dict[str, set[str]] = {}
        for path, split in split_of.items():
            by_bytes.setdefault(hashlib.sha256(Path(path).read_bytes()).hexdigest(), set()).add(split)
        assert all(len(splits_of_twins) == 1 for splits_of_twins in by_bytes.values())  # nothing leaks
        assert len(splits.duplicates) == 5 and all(len(group) == 2 for group in splits.duplicates)
        counts = splits.class_counts()
        assert counts["val"]["cat"] + counts["test"]["cat"] <= 10 and counts["train"]["cat"] >= 15


def test_identical_groups_compares_sizes_then_heads_then_whole_files(tmp_path: Path) -> None:
    def write(name: str, data: bytes) -> tuple[str, int]:
        path = tmp_path / name
        path.write_bytes(data)
        return str(path), len(data)

    big = os.urandom(HEAD_BYTES + 100)
    files = [
        write("a", b"x" * 10),
        write("b", b"y" * 10),  # same size, other bytes
        write("c", b"x" * 10),  # same as a
        write("d", big),
        write("e", big[:-1] + bytes([big[-1] ^ 1])),  # same size and head, last byte differs
        write("f", big),  # same as d
        (str(tmp_path / "gone"), 10),  # unreadable: a group of its own
    ]
    names = [[Path(p).name for p in group] for group in identical_groups(files)]
    assert names == [["a", "c"], ["b"], ["d", "f"], ["e"], ["gone"]]

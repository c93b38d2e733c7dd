"""Find the classes and images of an ImageFolder and split it, reproducibly, into train/val/test."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrain.data.images import IMAGE_EXTENSIONS
from retrain.errors import DataError

SPLITS = ("train", "val", "test")
Sample = tuple[str, int]


@dataclass
class DataSplits:
    """The class names and the (path, class index) samples of each split, plus how they were obtained."""

    root: Path
    layout: str  # "split" (root/train, root/val[, root/test]) or "folder" (root/<class>, split by fractions)
    class_names: list[str]
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    split_seed: int = 0
    val_fraction: float = 0.0
    test_fraction: float = 0.0

    def sizes(self) -> dict[str, int]:
        """Number of images per split, for logs and metadata."""
        return {split: len(items) for split, items in self.samples.items()}

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split, to spot imbalance and to record in the artifact."""
        out = {}
        for split, items in self.samples.items():
            counts = Counter(label for _, label in items)
            out[split] = {name: counts.get(i, 0) for i, name in enumerate(self.class_names)}
        return out

    def fingerprint(self) -> str:
        """A hash of every split's relative file list, so a changed dataset is detected on resume or eval."""
        digest = hashlib.sha256()
        for split in SPLITS:
            for path, label in self.samples.get(split, []):
                digest.update(f"{split}\0{os.path.relpath(path, self.root)}\0{label}\n".encode())
        return digest.hexdigest()

    def summary(self) -> dict[str, Any]:
        """The dataset facts every artifact carries."""
        return {
            "root": str(self.root),
            "layout": self.layout,
            "split_sizes": self.sizes(),
            "class_counts": self.class_counts(),
            "fingerprint": self.fingerprint(),
            "split_seed": self.split_seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
        }

    def without(self, bad: set[str]) -> DataSplits:
        """A copy with the given file paths excluded (the `on_bad_file=skip` policy)."""
        kept = {s: [(p, y) for p, y in items if p not in bad] for s, items in self.samples.items()}
        return DataSplits(
            self.root,
            self.layout,
            self.class_names,
            kept,
            self.split_seed,
            self.val_fraction,
            self.test_fraction,
        )

    def save(self, path: Path) -> None:
        """Record the split in the run directory (relative paths), so resume and eval see the same one."""
        data = {
            "root": str(self.root),
            "layout": self.layout,
            "class_names": self.class_names,
            "fingerprint": self.fingerprint(),
            "samples": {s: [[os.path.relpath(p, self.root), y] for p, y in items] for s, items in self.samples.items()},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))


def _visible(name: str) -> bool:
    return not name.startswith(".") and name != "__MACOSX"


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and _visible(e.name))


def _images(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        found += [
            os.path.join(dirpath, f) for f in sorted(filenames) if _visible(f) and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return found


def _scan_classes(folder: Path, class_names: list[str]) -> list[Sample]:
    return [(path, idx) for idx, name in enumerate(class_names) for path in _images(folder / name)]


def _require_images(samples: list[Sample], folder: Path) -> None:
    if not samples:
        raise DataError(
            f"No images found under {folder}: its class folders hold no files with an image extension "
            f"({', '.join(IMAGE_EXTENSIONS[:6])}, ...). Expected {folder}/<class>/<image>. "
            "Fix: put the images into one sub-folder per class."
        )


def discover(root: str | Path, *, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0) -> DataSplits:
    """Read the class names and samples of `root` in either supported layout, failing with a clear fix."""
    root = Path(root).expanduser().resolve()
    layout_help = (
        "Expected either DIR/train/<class>/*, DIR/val/<class>/* (and optionally DIR/test/<class>/*), "
        "or DIR/<class>/* split by data.val_fraction and data.test_fraction."
    )
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise DataError(
            f"data.root={root} {what}. {layout_help} Fix: pass data.root=/path/to/images, "
            "or run `make demo-data` and use data.root=data/demo."
        )
    if (root / "train").is_dir():
        class_names = _class_dirs(root / "train")
        if not class_names:
            raise DataError(f"{root / 'train'} has no class sub-folders. {layout_help}")
        if not (root / "val").is_dir():
            raise DataError(
                f"{root} has train/ but no val/ folder. {layout_help} "
                "Fix: add DIR/val/<class>/*, or move the class folders up into DIR to split automatically."
            )
        splits = DataSplits(root, "split", class_names)
        for split in SPLITS:
            folder = root / split
            if not folder.is_dir():
                continue
            found = _class_dirs(folder)
            if found != class_names:
                missing = sorted(set(class_names) - set(found))
                extra = sorted(set(found) - set(class_names))
                raise DataError(
                    f"The classes in {folder} differ from those in {root / 'train'}: missing {missing}, "
                    f"unexpected {extra}. Expected the same class folders in every split. "
                    "Fix: add or rename the folders so train/, val/ and test/ list the same classes."
                )
            splits.samples[split] = _scan_classes(folder, class_names)
            _require_images(splits.samples[split], folder)
        return splits

    class_names = _class_dirs(root)
    if not class_names:
        raise DataError(f"{root} has no class sub-folders. {layout_help}")
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must each be in [0, 1) "
            "and sum to less than 1; e.g. data.val_fraction=0.1 data.test_fraction=0.1."
        )
    everything = _scan_classes(root, class_names)
    _require_images(everything, root)
    splits = DataSplits(root, "folder", class_names, {s: [] for s in SPLITS}, seed, val_fraction, test_fraction)
    rng = random.Random(seed)
    for idx in range(len(class_names)):
        items = [s for s in everything if s[1] == idx]
        rng.shuffle(items)  # stratified: every class is split by the same fractions
        n_val, n_test = round(len(items) * val_fraction), round(len(items) * test_fraction)
        splits.samples["val"] += items[:n_val]
        splits.samples["test"] += items[n_val : n_val + n_test]
        splits.samples["train"] += items[n_val + n_test :]
    if not splits.samples["test"]:
        del splits.samples["test"]
    if not splits.samples["val"]:
        raise DataError(
            f"data.val_fraction={val_fraction} leaves no validation images in {root}. "
            "Fix: raise data.val_fraction, or add more images per class."
        )
    return splits


def load_recorded(path: Path, root: str | Path) -> DataSplits:
    """Reload a split recorded by `DataSplits.save`, checking that the files still exist under `root`."""
    data = json.loads(Path(path).read_text())
    root = Path(root).expanduser().resolve()
    splits = DataSplits(root, data["layout"], data["class_names"])
    for split, items in data["samples"].items():
        splits.samples[split] = [(str(root / rel), y) for rel, y in items]
    missing = [p for items in splits.samples.values() for p, _ in items if not os.path.exists(p)]
    if missing:
        raise DataError(
            f"The split recorded in {path} names {len(missing)} files that no longer exist under {root}, "
            f"e.g. {missing[0]}. Fix: point data.root at the original folder, or start a new run."
        )
    return splits


def split_as_recorded(
    root: str | Path,
    recorded: Mapping[str, Any] | None,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> DataSplits:
    """The split a run recorded, made again at `root`, so resume, eval and reports score the images it held out.

    A flat folder reloads the run's file list while its split file exists; otherwise the folder is discovered with
    the recorded fractions and seed (the given ones where nothing was recorded).
    """
    recorded = recorded or {}
    split_file = recorded.get("split_file")
    if split_file and Path(split_file).is_file() and recorded.get("layout") == "folder":
        return load_recorded(Path(split_file), root)
    return discover(
        root,
        val_fraction=recorded.get("val_fraction", val_fraction),
        test_fraction=recorded.get("test_fraction", test_fraction),
        seed=recorded.get("split_seed", seed),
    )

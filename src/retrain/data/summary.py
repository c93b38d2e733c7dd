"""What a run is about to learn from, said before it starts, with warnings for data that would mislead it.

The summary gives images per class per split, the image-size range (from the scan's header reads, so nothing is
decoded twice), the imbalance ratio and the duplicate groups the split kept together. The warnings are for
what used to pass in silence: a class too small to learn or absent from val/test (which then never score it),
a data.root one level too high, image files the loader skips, linked folders not followed, and a largest class
more than IMBALANCE_WARNING times the smallest.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from retrain.data.splits import LINKED_FILE, SKIPPED_IMAGE, SYMLINK_LOOP, DataSplits
from retrain.data.validate import LEAKAGE, ImageSize, ValidationReport, format_size_range, shown_path

log = logging.getLogger("retrain")

IMBALANCE_WARNING = 5.0  # largest / smallest class in train above this: warn (issue 14)
MIN_TRAIN_IMAGES = 2
MAX_ROWS = 20  # more classes than this: the smallest and largest ones are listed


@dataclass
class DataSummary:
    """The facts and warnings printed at the start of training; `lines` is the table, `warnings` one per finding."""

    splits: DataSplits
    size_range: tuple[ImageSize, ImageSize] | None = None
    warnings: list[str] = field(default_factory=list)

    def imbalance(self) -> float:
        """Images of the largest class over the smallest one in train (inf when a class has none)."""
        counts = self.splits.class_counts().get("train", {})
        if not counts:
            return 1.0
        smallest = min(counts.values())
        return max(counts.values()) / smallest if smallest else math.inf

    def lines(self) -> list[str]:
        """The summary as text lines: where the data is, the per-class table, sizes, balance and duplicates."""
        splits = self.splits
        how = (
            f"data.val_fraction={splits.val_fraction}, data.test_fraction={splits.test_fraction}, "
            f"data.split_seed={splits.split_seed}"
            if splits.layout == "folder"
            else "split folders as laid out"
        )
        lines = [f"Dataset {splits.root} ({splits.layout} layout: {how})", *self._table()]
        sizes = format_size_range(self.size_range) + " (from the headers)" if self.size_range else "not read"
        lines.append(f"Image sizes: {sizes}")
        train = splits.class_counts().get("train", {})
        if train:
            big, small = max(train, key=train.__getitem__), min(train, key=train.__getitem__)
            extremes = (
                f"largest/smallest class in train: {big} {train[big]}, {small} {train[small]}"
                if train[big] != train[small]
                else f"every class has {train[big]} images in train"
            )
            lines.append(f"Imbalance: {self.imbalance():.1f} ({extremes})")
        groups = splits.duplicates
        if groups:
            files = sum(len(group) for group in groups)
            lines.append(
                f"Duplicates: {_count(len(groups), 'group')} of byte-identical files ({files} files), "
                "each kept in one split"
            )
        linked = sum(p.kind == LINKED_FILE for p in splits.found)
        if linked:
            lines.append(f"Linked files: {_count(linked, 'link')} to files already counted, each counted once")
        return lines

    def _table(self) -> list[str]:
        counts = self.splits.class_counts()
        names = self.splits.class_names
        if len(names) > MAX_ROWS:  # the extremes are what matters: the smallest classes, then the largest
            train = counts.get("train", {})
            ranked = sorted(names, key=lambda n: (train.get(n, 0), n))
            names = [*ranked[: MAX_ROWS // 2], "...", *ranked[-MAX_ROWS // 4 :]]
        width = max(len("class"), len("total"), *map(len, names))
        split_names = [s for s in ("train", "val", "test") if s in counts]
        rows = [f"  {'class':<{width}}" + "".join(f"{s:>8}" for s in split_names)]
        for name in names:
            if name == "...":
                rows.append(f"  ... {len(self.splits.class_names) - len(names) + 1} classes not shown")
                continue
            rows.append(f"  {name:<{width}}" + "".join(f"{counts[s][name]:>8}" for s in split_names))
        sizes = self.splits.sizes()
        rows.append(f"  {'total':<{width}}" + "".join(f"{sizes[s]:>8}" for s in split_names))
        return rows


def summarize(splits: DataSplits, report: ValidationReport | None = None) -> DataSummary:
    """The summary of what will be trained on, and every warning it deserves; `report` gives the image sizes."""
    summary = DataSummary(splits, report.size_range if report else None)
    summary.warnings = [
        *_class_warnings(splits),
        *_folder_warnings(splits),
        *_leakage_warning(splits, report),
        *_imbalance_warning(summary),
    ]
    return summary


def _leakage_warning(splits: DataSplits, report: ValidationReport | None) -> list[str]:
    """Images of val/ or test/ with the same bytes as one of an earlier split: scored as if never seen."""
    leaks = [p for p in report.problems if p.kind == LEAKAGE] if report else []
    if not leaks:
        return []
    kept = " (k-fold CV keeps identical files of train/ and val/ in one fold)" if splits.cv else ""
    return [
        f"{_count(len(leaks), 'image')} in a held-out split have the same bytes as an image of an earlier split "
        f"(e.g. {shown_path(splits.root, leaks[0].path)}: {leaks[0].detail}): they score as images never seen, "
        f"so the held-out numbers come out too high{kept}. Fix: remove the copies; `retrain validate "
        f"{splits.root}` lists them all."
    ]


def _class_warnings(splits: DataSplits) -> list[str]:
    """Classes too small to learn, or absent from val or test, which then never score them."""
    out = []
    counts = splits.class_counts()
    few = {name: n for name, n in counts.get("train", {}).items() if n < MIN_TRAIN_IMAGES}
    if few:
        listed = ", ".join(f"{name} {n}" for name, n in few.items())
        out.append(
            f"Classes with fewer than {MIN_TRAIN_IMAGES} training images: {listed}. A class needs several images "
            "to be learned at all. Fix: add images of these classes, or remove their folders."
        )
    held_out = ("test",) if splits.cv.get("fold") == "refit" else ("val", "test")  # a CV refit has no val on purpose
    for split in held_out:
        absent = ", ".join(name for name, n in counts.get(split, {}).items() if not n)
        if absent:
            out.append(f"{split} has no images of {absent}, so {split}/acc never scores them. {_fix(splits, split)}")
    return out


def _folder_warnings(splits: DataSplits) -> list[str]:
    """A data.root one level too high, image files the loader skips, and linked folders it did not follow."""
    out = []
    nested = _nested_classes(splits)
    if nested:
        listed = "; ".join(f"{name}/ holds only the folders {', '.join(subs)}" for name, subs in nested.items())
        base = splits.root if splits.layout == "folder" else splits.root / "<split>"
        out.append(
            f"data.root={splits.root} may be one level too high: class folders hold class folders and no images "
            f"of their own ({listed}). Expected {base}/<class>/<image>. Fix: point data.root one level lower "
            f"(e.g. data.root={splits.root / next(iter(nested))}), or move the images up into their class folder."
        )
    skipped = [p for p in splits.found if p.kind == SKIPPED_IMAGE]
    if skipped:
        by_suffix = Counter(p.path.suffix.lower() for p in skipped)
        kinds = ", ".join(f"{suffix} {n}" for suffix, n in by_suffix.most_common())
        out.append(
            f"{_count(len(skipped), 'image file')} skipped: the loader does not read their format ({kinds}; e.g. "
            f"{shown_path(splits.root, skipped[0].path)}). Fix: convert them to JPEG or PNG; "
            f"`retrain validate {splits.root}` lists them all."
        )
    loops = [p for p in splits.found if p.kind == SYMLINK_LOOP]
    if loops:
        out.append(
            f"{_count(len(loops), 'linked folder')} not followed, because they lead back to folders already read "
            f"(e.g. {shown_path(splits.root, loops[0].path)}: {loops[0].detail}). Their images are counted once. "
            f"Fix: remove the links; `retrain validate {splits.root}` lists them all."
        )
    return out


def _imbalance_warning(summary: DataSummary) -> list[str]:
    train = summary.splits.class_counts().get("train", {})
    if not train or summary.imbalance() <= IMBALANCE_WARNING:
        return []
    big, small = max(train, key=train.__getitem__), min(train, key=train.__getitem__)
    return [
        f"The largest class in train ({big}, {train[big]} images) has {summary.imbalance():.1f}x the images of "
        f"the smallest ({small}, {train[small]}); above {IMBALANCE_WARNING:g}x, accuracy mostly measures the "
        "large classes. Fix: add images of the small classes, or weight the loss with model.class_weights=balanced, "
        "or draw every class equally often with data.sampler=balanced; monitor=val/bal_acc picks the epoch by "
        "balanced accuracy, and the report's per-class table shows what each class scores."
    ]


def log_data_summary(splits: DataSplits, report: ValidationReport | None = None) -> DataSummary:
    """Log the dataset summary (train.log and the terminal) and one warning per finding; returns what was logged."""
    summary = summarize(splits, report)
    log.info("\n".join(summary.lines()))
    for text in summary.warnings:
        log.warning(text)
    return summary


def weights_origin(init_from: str | None, resumed_from: str | Path | None = None) -> str:
    """Where training starts from, in words, so that nobody trains from random weights by mistake."""
    if resumed_from:
        return f"resumed from {resumed_from}"
    if init_from is None:
        return "random (model.init_from=null); model.init_from=IMAGENET1K_V1 starts from ImageNet weights instead"
    return f"from {init_from} (model.init_from)"


def log_weights_origin(init_from: str | None, resumed_from: str | Path | None = None) -> None:
    """Log where the weights start, as the last line of the dataset summary."""
    log.info("Weights: %s", weights_origin(init_from, resumed_from))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _fix(splits: DataSplits, split: str) -> str:
    if splits.layout == "split":
        return f"Fix: add images of them to {splits.root / split}/<class>/."
    fraction = splits.val_fraction if split == "val" else splits.test_fraction
    need = math.floor(0.5 / fraction) + 1  # round() gives a class its first image from n * fraction > 0.5 on
    return (
        f"Fix: add images (with data.{split}_fraction={fraction} a class needs at least {need} for one to go to "
        f"{split}), or raise data.{split}_fraction."
    )


def _nested_classes(splits: DataSplits) -> dict[str, list[str]]:
    """Class folders without images of their own but with two or more sub-folders of images: classes, maybe."""
    direct: set[str] = set()
    subfolders: dict[str, set[str]] = defaultdict(set)
    for split, items in splits.samples.items():
        for path, label in items:
            name = splits.class_names[label]
            folder = splits.root / name if splits.layout == "folder" else splits.root / split / name
            parts = Path(os.path.relpath(path, folder)).parts
            if len(parts) == 1:
                direct.add(name)
            else:
                subfolders[name].add(parts[0])
    return {name: sorted(subs) for name, subs in subfolders.items() if name not in direct and len(subs) > 1}

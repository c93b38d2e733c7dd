"""Scan an image folder before training: bad files, empty or mismatched classes, hidden files and leakage.

Usage: `retrain validate DIR [--full]`; exit 1 when training would stop, 2 on a usage error.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from retrain.data.images import IMAGE_PROBLEM_KINDS, check_image
from retrain.data.splits import (
    DUPLICATE,
    HIDDEN,
    IGNORED,
    LINKED_CLASS,
    LINKED_FILE,
    SKIPPED_IMAGE,
    SYMLINK_LOOP,
    FolderWalk,
    Problem,
    identical_groups,
    is_hidden_name,
)
from retrain.errors import ConfigError, DataError
from retrain.utils.io import sha256_file

SPLITS = ("train", "val", "test")
MODES = ("quick", "full")
ALL = "all"  # the class_names key of the folder layout, which has no split folders

# Structure kinds (the image-level kinds live in retrain.data.images).
NO_CLASSES = "no_classes"
MISSING_SPLIT = "missing_split"
MISSING_CLASS = "missing_class"
EMPTY_CLASS = "empty_class"
LEAKAGE = "leakage"
# The folder walk's kinds (hidden, ignored, skipped_image, symlink_loop, linked_class, linked_file, duplicate) live in
# retrain.data.splits, which discovers the dataset the same way.

ERROR_KINDS = (*IMAGE_PROBLEM_KINDS, NO_CLASSES, MISSING_SPLIT, MISSING_CLASS, EMPTY_CLASS, LINKED_CLASS)
WARNING_KINDS = (LEAKAGE, DUPLICATE, SYMLINK_LOOP, LINKED_FILE, SKIPPED_IMAGE, HIDDEN)
NOTE_KINDS = (IGNORED,)
KINDS = ERROR_KINDS + WARNING_KINDS + NOTE_KINDS
ImageSize = tuple[int, int]  # (width, height) from the file's header


@dataclass
class ValidationReport:
    """Everything `scan` found, so training can stop or skip bad files with the reason shown to the user."""

    root: Path
    mode: str
    layout: str  # "split" (root/train, root/val[, root/test]) or "folder" (root/<class>)
    problems: list[Problem] = field(default_factory=list)
    n_files: int = 0  # files with an image extension that were checked
    class_names: dict[str, list[str]] = field(default_factory=dict)  # per split, or under ALL
    size_range: tuple[ImageSize, ImageSize] | None = None  # fewest and most pixels among the readable images
    identical: list[list[Path]] = field(default_factory=list)  # byte-identical files in two or more splits

    def bad_files(self) -> list[Path]:
        """The files that must be left out of training, because no loader can read them."""
        return sorted({p.path for p in self.problems if p.kind in IMAGE_PROBLEM_KINDS})

    def counts(self) -> dict[str, int]:
        """Number of problems per kind, in the order of KINDS."""
        found = Counter(p.kind for p in self.problems)
        return {kind: found[kind] for kind in KINDS if found[kind]}

    def has_errors(self) -> bool:
        """Whether training would stop: a bad file, or a class or split that is missing or empty."""
        return any(p.kind in ERROR_KINDS for p in self.problems)

    def format(self, max_rows: int = 20) -> str:
        """A readable report: counts per kind, then the paths of each kind (at most max_rows each)."""
        splits = ", ".join(f"{split} {len(names)}" for split, names in self.class_names.items())
        lines = [
            f"Data folder: {self.root}",
            f"{self.layout} layout, classes: {splits or 'none'}; {self.n_files} image files checked ({self.mode} mode)",
        ]
        if self.size_range:
            lines.append(f"image sizes {format_size_range(self.size_range)} (from the headers)")
        counts = self.counts()
        if not counts:
            return "\n".join([*lines, "No problems found."])
        width = max(map(len, counts))
        for title, kinds in (
            ("Errors (training stops)", ERROR_KINDS),
            ("Warnings", WARNING_KINDS),
            ("Notes", NOTE_KINDS),
        ):
            rows = [f"  {kind:<{width}}  {counts[kind]}" for kind in kinds if kind in counts]
            if rows:
                lines += [f"{title}:", *rows]
        for kind in counts:
            of_kind = [p for p in self.problems if p.kind == kind]
            lines += ["", f"{kind} ({len(of_kind)}):"]
            lines += [f"  {shown_path(self.root, p.path)}: {p.detail}" for p in of_kind[:max_rows]]
            if len(of_kind) > max_rows:
                lines.append(f"  ... and {len(of_kind) - max_rows} more")
        return "\n".join(lines)


def format_size_range(size_range: tuple[ImageSize, ImageSize]) -> str:
    """'32x24 to 4000x3000 px', or '32x32 px' when every image has one size."""
    (w0, h0), (w1, h1) = size_range
    return f"{w0}x{h0} px" if size_range[0] == size_range[1] else f"{w0}x{h0} to {w1}x{h1} px"


def shown_path(root: Path, path: Path) -> str:
    """A path as the user knows it: relative to the data folder when inside it."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def scan(root: str | Path, *, mode: str = "quick", workers: int | None = None) -> ValidationReport:
    """Check a data folder in either layout; `quick` reads headers, `full` decodes every image."""
    if mode not in MODES:
        raise ConfigError(
            f"data.validate={mode!r} is not a scan mode; expected one of {list(MODES)}. "
            "Fix: data.validate=quick (headers only) or data.validate=full (decode every image)."
        )
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise DataError(
            f"The data folder {root} {what}. Expected a folder holding train/<class>/ and val/<class>/ "
            "(optionally test/<class>/), or one folder per class. Fix: pass the path of that folder."
        )
    survey = _Survey(root)
    folders = survey.split_folders()
    report = ValidationReport(root, mode, "split" if ALL not in folders else "folder")
    for split, folder in folders.items():
        report.class_names[split] = survey.class_dirs(folder)
    # The walk that discover() makes: real paths once, loops and linked classes reported, not followed.
    walk = FolderWalk(root, [folder / name for split, folder in folders.items() for name in report.class_names[split]])
    images: list[tuple[str, str, Path]] = []  # (split, class, path)
    for split, folder in folders.items():
        for name, files in walk.walk_split(folder, report.class_names[split]).items():
            images += [(split, name, Path(path)) for path, _ in files]
            if report.layout == "folder":  # the automatic split keeps identical files together: say which
                survey.check_duplicates(files)
    survey.problems += walk.found
    report.n_files = len(images)
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    with warnings.catch_warnings(), ThreadPoolExecutor(workers) as pool:
        # Filters are process-wide, so silencing here covers the workers; bombs are reported by size instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        checked = list(pool.map(lambda item: _check_and_measure(item[2], full=mode == "full"), images))
        survey.problems += [Problem(item[2], *f) for item, (f, _) in zip(images, checked, strict=True) if f]
        good = [item for item, (f, _) in zip(images, checked, strict=True) if not f]
        sizes = [size for _, size in checked if size]
        if sizes:
            report.size_range = min(sizes, key=_pixels), max(sizes, key=_pixels)
        linked = {p.path for p in walk.linked_classes()}
        survey.check_classes(report.class_names, folders, images, good, linked)
        if report.layout == "split":
            report.identical = survey.check_leakage(good, pool)
    report.problems = sorted(survey.problems, key=lambda p: (KINDS.index(p.kind), str(p.path)))
    return report


def _check_and_measure(path: Path, *, full: bool) -> tuple[tuple[str, str] | None, ImageSize | None]:
    """check_image's verdict, and the size a good file's header gives (a second header read, never a decode)."""
    problem = check_image(path, full=full)
    if problem:
        return problem, None
    with Image.open(path) as img:
        return None, img.size


def _pixels(size: ImageSize) -> int:
    return size[0] * size[1]


class _Survey:
    """Looks at the folder the way the DataModule reads it, collecting the structure problems on the way."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.problems: list[Problem] = []

    def split_folders(self) -> dict[str, Path]:
        present = [s for s in SPLITS if (self.root / s).is_dir()]
        if not present:
            return {ALL: self.root}
        for split in ("train", "val"):
            if split not in present:
                self.add(self.root / split, MISSING_SPLIT, f"the split layout needs {split}/<class>/ folders")
        for entry in self._entries(self.root):
            if entry.name not in present:
                self.add(Path(entry.path), IGNORED, "not a train/, val/ or test/ folder")
        return {s: self.root / s for s in present}

    def class_dirs(self, folder: Path) -> list[str]:
        names = []
        for entry in self._entries(folder):
            if entry.is_dir():
                names.append(entry.name)
            else:
                self.add(Path(entry.path), IGNORED, "a file outside any class folder")
        if not names:
            self.add(folder, NO_CLASSES, "no class sub-folders; expected one folder of images per class")
        return names

    def check_duplicates(self, files: list[tuple[str, int]]) -> None:
        for group in identical_groups(files):
            if len(group) < 2:
                continue
            first = shown_path(self.root, Path(group[0]))
            for path in group[1:]:
                self.add(Path(path), DUPLICATE, f"the same bytes as {first}; the automatic split keeps them together")

    def check_classes(
        self,
        class_names: dict[str, list[str]],
        folders: dict[str, Path],
        images: list[tuple[str, str, Path]],
        good: list[tuple[str, str, Path]],
        linked: set[Path],
    ) -> None:
        total = Counter((split, name) for split, name, _ in images)
        usable = Counter((split, name) for split, name, _ in good)
        for split, names in class_names.items():
            for name in names:
                if not usable[split, name] and folders[split] / name not in linked:  # linked: reported as such
                    n = total[split, name]
                    detail = f"all {n} image files are bad" if n else "no file with an image extension"
                    self.add(folders[split] / name, EMPTY_CLASS, detail)
        if "train" not in class_names:
            return
        train = set(class_names["train"])
        for split in ("val", "test"):
            if split not in class_names:
                continue
            other = set(class_names[split])
            for name in sorted(train - other):
                self.add(folders[split] / name, MISSING_CLASS, f"class {name!r} is in train/ but not in {split}/")
            for name in sorted(other - train):
                self.add(folders["train"] / name, MISSING_CLASS, f"class {name!r} is in {split}/ but not in train/")

    def check_leakage(self, good: list[tuple[str, str, Path]], pool: ThreadPoolExecutor) -> list[list[Path]]:
        """Report every image whose bytes are also in an earlier split; returns the groups of identical files."""
        # Only files whose size occurs in two splits can be equal, so most files are never hashed.
        by_size: dict[int, list[tuple[str, Path]]] = defaultdict(list)
        for split, _, path in good:
            by_size[path.stat().st_size].append((split, path))
        candidates = [item for group in by_size.values() if len({s for s, _ in group}) > 1 for item in group]
        digests = pool.map(lambda item: sha256_file(item[1]), candidates)
        by_digest: dict[str, list[tuple[str, Path]]] = defaultdict(list)
        for item, digest in zip(candidates, digests, strict=True):
            by_digest[digest].append(item)
        leaking = [group for group in by_digest.values() if len({s for s, _ in group}) > 1]
        for group in leaking:
            first_split = min(SPLITS.index(s) for s, _ in group)
            original = min(p for s, p in group if SPLITS.index(s) == first_split)
            for split, path in group:
                if SPLITS.index(split) > first_split:
                    relative = original.relative_to(self.root)
                    self.add(path, LEAKAGE, f"same bytes as {relative}: the image leaks across splits")
        return [sorted(path for _, path in group) for group in leaking]

    def add(self, path: Path, kind: str, detail: str) -> None:
        self.problems.append(Problem(path, kind, detail))

    def _entries(self, folder: Path) -> Iterable[os.DirEntry[str]]:
        """Sorted entries of a folder; hidden ones are reported and left out."""
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if is_hidden_name(entry.name):
                self.add(Path(entry.path), HIDDEN, "hidden, left out of the dataset")
            else:
                yield entry


def raise_for_bad_files(report: ValidationReport, max_shown: int = 10) -> None:
    """Stop training with one message that lists the bad files (`data.on_bad_file=error`); return if none."""
    bad = report.bad_files()
    if not bad:
        return
    kinds = Counter(p.kind for p in report.problems if p.kind in IMAGE_PROBLEM_KINDS)
    breakdown = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    shown = ", ".join(shown_path(report.root, p) for p in bad[:max_shown])
    more = f" and {len(bad) - max_shown} more" if len(bad) > max_shown else ""
    raise DataError(
        f"{len(bad)} image files under {report.root} cannot be read ({breakdown}): {shown}{more}. "
        "Expected every file with an image extension to decode. Fix: delete or replace them, or set "
        "data.on_bad_file=skip to train without them (they are then listed in bad_files.txt); "
        f"`retrain validate {report.root} --full` says what is wrong with each."
    )


if __name__ == "__main__":  # legacy form of the retrain command
    import sys

    from retrain.cli.main import legacy_entry

    sys.exit(legacy_entry("validate"))

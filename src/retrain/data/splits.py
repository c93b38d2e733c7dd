"""Find the classes and images of an ImageFolder and split it, reproducibly, into train/val/test."""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from retrain.data.images import IMAGE_EXTENSIONS, has_image_extension
from retrain.errors import DataError
from retrain.utils.io import sha256_file

SPLITS = ("train", "val", "test")
Sample = tuple[str, int]
ImageFile = tuple[str, int]  # (path, size in bytes; -1 when the file cannot be read)

# What the folder walk leaves out or counts once, besides the images it keeps (retrain.data.validate reports them).
HIDDEN = "hidden"
IGNORED = "ignored"
SKIPPED_IMAGE = "skipped_image"  # an image format the loader does not read (GIF, HEIC, ...)
SYMLINK_LOOP = "symlink_loop"  # a linked folder that leads back to one already scanned: not followed
LINKED_CLASS = "linked_class"  # a class folder that is another class's folder: training stops
LINKED_FILE = "linked_file"  # a link (or hard link) to a file already counted: counted once
DUPLICATE = "duplicate"  # the same bytes as another file of its class: the automatic split keeps them together
# Files are compared in full only when their sizes and first 4 KiB (one page) agree, so most files are never read.
HEAD_BYTES = 1 << 12


@dataclass(frozen=True)
class Problem:
    """One finding: the file or folder it is about, its kind (a constant here or in validate) and what was seen."""

    path: Path
    kind: str
    detail: str = ""


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
    found: list[Problem] = field(default_factory=list)  # what the folder walk left out or counted once
    duplicates: list[list[str]] = field(default_factory=list)  # byte-identical files, each group in one split
    cv: dict[str, Any] = field(default_factory=dict)  # k-fold CV: fold, folds, seed, group_by, assignment (folds.py)

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
            **({"cv": {k: v for k, v in self.cv.items() if k != "assignment"}} if self.cv else {}),
        }

    def without(self, bad: set[str]) -> DataSplits:
        """A copy with the given file paths excluded (the `on_bad_file=skip` policy)."""
        kept = {s: [(p, y) for p, y in items if p not in bad] for s, items in self.samples.items()}
        return replace(self, samples=kept)

    def save(self, path: Path) -> None:
        """Record the split in the run directory (relative paths), so resume and eval see the same one."""
        data = {
            "root": str(self.root),
            "layout": self.layout,
            "class_names": self.class_names,
            "fingerprint": self.fingerprint(),
            # How the flat layout was drawn: a reloaded split says so (not the dataclass's 0.0 defaults).
            "split_seed": self.split_seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "samples": {s: [[os.path.relpath(p, self.root), y] for p, y in items] for s, items in self.samples.items()},
            **({"cv": self.cv} if self.cv else {}),  # the fold of every pool image, reused on resume
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))


def is_hidden_name(name: str) -> bool:
    """Dot-names and macOS zip debris, which no loader of this project reads as classes or images."""
    return name.startswith(".") or name == "__MACOSX"


def is_skipped_image(name: str) -> bool:
    """A picture the loader does not read (GIF, HEIC, ...): left out like any other file, but worth a warning."""
    return not has_image_extension(name) and (mimetypes.guess_type(name)[0] or "").startswith("image/")


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not is_hidden_name(e.name))


class FolderWalk:
    """Walks class folders by real path: every folder and file once; links that lead back are reported, not followed.

    `os.walk(followlinks=True)` alone follows `ln -s .. cat/loop` into the other classes and round again (774
    images instead of 8). Here a linked folder is not entered when it is the data folder, a split or class
    folder, an ancestor of the data folder, or a folder already scanned (same st_dev and st_ino), and a file
    already counted (a link or a hard link) is counted once. Class folders that are not links are walked first,
    so of a class and its linked copy, the copy is the one reported.
    """

    def __init__(self, root: Path, class_folders: Iterable[Path]) -> None:
        self.root = root
        self.found: list[Problem] = []
        self._root_real = Path(os.path.realpath(root))
        folders = list(class_folders)
        # What a link into one of these would walk into, in the words of the report.
        self._fences = {
            Path(os.path.realpath(f.parent)): f"{self.name(f.parent)}, which holds classes" for f in folders
        }
        self._fences.update({Path(os.path.realpath(f)): f"the class folder {self.name(f)}" for f in folders})
        self._fences[self._root_real] = "the data folder"
        self._dirs: dict[tuple[int, int], Path] = {}
        self._files: dict[tuple[int, int], str] = {}

    def walk_split(self, folder: Path, class_names: list[str]) -> dict[str, list[ImageFile]]:
        """The image files of each class folder of one split, each file counted once in the split."""
        self._dirs, self._files = {}, {}
        links_last = sorted(class_names, key=lambda name: (os.path.islink(folder / name), name))
        images = {name: self._walk_class(folder / name) for name in links_last}
        return {name: images[name] for name in class_names}

    def linked_classes(self) -> list[Problem]:
        """The class folders that are another class's folder (or hold the data folder): training stops on them."""
        return [p for p in self.found if p.kind == LINKED_CLASS]

    def name(self, path: Path) -> str:
        """A path as the user knows it: relative to the data folder when inside it."""
        for base in (self.root, self._root_real):
            if path.is_relative_to(base):
                return path.relative_to(base).as_posix() if path != base else "the data folder"
        return str(path)

    def _walk_class(self, folder: Path) -> list[ImageFile]:
        real, key = Path(os.path.realpath(folder)), _dir_key(folder)
        if key in self._dirs or self._root_real.is_relative_to(real):
            same = self.name(self._dirs[key]) if key in self._dirs else f"{real}, which holds the data folder"
            self._add(folder, LINKED_CLASS, f"a link to {same}: its images would count twice")
            return []
        if key is not None:
            self._dirs[key] = folder
        images: list[ImageFile] = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = [name for name in sorted(dirnames) if self._enter(Path(dirpath, name), real)]
            for name in sorted(filenames):
                self._file(dirpath, name, images)
        return images

    def _enter(self, path: Path, class_real: Path) -> bool:
        if is_hidden_name(path.name):
            self._add(path, HIDDEN, "hidden folder, left out of the dataset")
            return False
        key, real = _dir_key(path), Path(os.path.realpath(path))
        if key in self._dirs:
            back = "its own class folder" if real == class_real else self.name(self._dirs[key])
            self._add(path, SYMLINK_LOOP, f"a link back to {back}, already scanned; not followed")
            return False
        if real in self._fences or self._root_real.is_relative_to(real):
            what = self._fences.get(real, f"{real}, which holds the data folder")
            self._add(path, SYMLINK_LOOP, f"a link to {what}; not followed")
            return False
        if key is not None:
            self._dirs[key] = path
        return True

    def _file(self, dirpath: str, name: str, images: list[ImageFile]) -> None:
        path = os.path.join(dirpath, name)  # a str: a Path per image would cost more than the stat
        if is_hidden_name(name):
            self._add(Path(path), HIDDEN, "hidden file, left out of the dataset")
        elif is_skipped_image(name):
            suffix = os.path.splitext(name)[1].lower()
            detail = f"a {suffix} image, which the loader skips; it reads {', '.join(IMAGE_EXTENSIONS)}"
            self._add(Path(path), SKIPPED_IMAGE, detail)
        elif not has_image_extension(name):
            self._add(Path(path), IGNORED, "no image extension, left out of the dataset")
        else:
            try:
                stat = os.stat(path)
            except OSError:  # a dangling link: kept, so that validate names it and training stops on it
                images.append((path, -1))
                return
            key = (stat.st_dev, stat.st_ino)
            if key in self._files:
                first = self.name(Path(self._files[key]))
                self._add(Path(path), LINKED_FILE, f"the same file as {first}; counted once")
            else:
                self._files[key] = path
                images.append((path, stat.st_size))

    def _add(self, path: Path, kind: str, detail: str) -> None:
        self.found.append(Problem(path, kind, detail))


def _dir_key(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def identical_groups(files: list[ImageFile]) -> list[list[str]]:
    """The files as groups of identical bytes, in first-seen order (most groups hold one file).

    Only files of equal size are read: their first HEAD_BYTES, then, where those agree too, the whole file.
    """
    by_size: dict[int, list[str]] = defaultdict(list)
    for path, size in files:
        by_size[size].append(path)
    same_as: dict[str, str] = {}  # path -> the first file with the same bytes
    for size, paths in by_size.items():
        if size < 0 or len(paths) < 2:
            continue
        for heads in _equal(paths, HEAD_BYTES):
            for equal in [heads] if size <= HEAD_BYTES else _equal(heads, None):
                same_as.update((path, equal[0]) for path in equal)
    groups: dict[str, list[str]] = {}
    for path, _ in files:
        groups.setdefault(same_as.get(path, path), []).append(path)
    return list(groups.values())


def _equal(paths: list[str], limit: int | None) -> list[list[str]]:
    by_digest: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        try:
            if limit is None:
                digest = sha256_file(Path(path))
            else:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read(limit)).hexdigest()
        except OSError:  # unreadable: validate names it; here it stays a group of its own
            continue
        by_digest[digest].append(path)
    return [same for same in by_digest.values() if len(same) > 1]


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
        present = [split for split in SPLITS if (root / split).is_dir()]
        for split in present:
            found = _class_dirs(root / split)
            if found != class_names:
                missing = sorted(set(class_names) - set(found))
                extra = sorted(set(found) - set(class_names))
                raise DataError(
                    f"The classes in {root / split} differ from those in {root / 'train'}: missing {missing}, "
                    f"unexpected {extra}. Expected the same class folders in every split. "
                    "Fix: add or rename the folders so train/, val/ and test/ list the same classes."
                )
        walk = FolderWalk(root, [root / split / name for split in present for name in class_names])
        splits = DataSplits(root, "split", class_names)
        for split in present:
            images = walk.walk_split(root / split, class_names)
            splits.samples[split] = [(path, idx) for idx, name in enumerate(class_names) for path, _ in images[name]]
            _require_images(splits.samples[split], root / split)
        _raise_for_linked_classes(walk)
        splits.found = walk.found
        return splits

    class_names = _class_dirs(root)
    if not class_names:
        raise DataError(f"{root} has no class sub-folders. {layout_help}")
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must each be in [0, 1) "
            "and sum to less than 1; e.g. data.val_fraction=0.1 data.test_fraction=0.1."
        )
    walk = FolderWalk(root, [root / name for name in class_names])
    images = walk.walk_split(root, class_names)
    _require_images([sample for name in class_names for sample in images[name]], root)
    _raise_for_linked_classes(walk)
    splits = DataSplits(root, "folder", class_names, {s: [] for s in SPLITS}, seed, val_fraction, test_fraction)
    splits.found = walk.found
    rng = random.Random(seed)
    for idx, name in enumerate(class_names):
        groups = identical_groups(images[name])
        splits.duplicates += [group for group in groups if len(group) > 1]
        # Stratified: every class is split by the same fractions. Identical files go together, so none of them
        # leaks from train into val or test; without duplicates this is the plain shuffle-and-cut of every class.
        rng.shuffle(groups)
        n_val, n_test = round(len(images[name]) * val_fraction), round(len(images[name]) * test_fraction)
        chosen: dict[str, list[Sample]] = {split: [] for split in SPLITS}
        for group in groups:
            fits = [s for s, n in (("val", n_val), ("test", n_test)) if len(chosen[s]) + len(group) <= n]
            chosen[fits[0] if fits else "train"] += [(path, idx) for path in group]
        for split in SPLITS:
            splits.samples[split] += chosen[split]
    if not splits.samples["test"]:
        del splits.samples["test"]
    if not splits.samples["val"]:
        raise DataError(
            f"data.val_fraction={val_fraction} leaves no validation images in {root}. "
            "Fix: raise data.val_fraction, or add more images per class."
        )
    return splits


def _raise_for_linked_classes(walk: FolderWalk) -> None:
    """Stop on a class folder that is another class's: the same images would train under two labels."""
    linked = walk.linked_classes()
    if linked:
        listed = "; ".join(f"{walk.name(p.path)} is {p.detail}" for p in linked[:10])
        raise DataError(
            f"Class folders under {walk.root} are links to folders already read ({len(linked)}): {listed}. "
            "Expected each class folder to hold images of its own; a linked copy would train the same images "
            "under two labels. Fix: remove the link, or replace it with that class's own images; "
            f"`retrain validate {walk.root}` lists every link."
        )


def load_recorded(path: Path, root: str | Path) -> DataSplits:
    """Reload a split recorded by `DataSplits.save`, checking that the files still exist under `root`."""
    data = json.loads(Path(path).read_text())
    root = Path(root).expanduser().resolve()
    drawn = {key: data[key] for key in ("split_seed", "val_fraction", "test_fraction") if key in data}
    splits = DataSplits(root, data["layout"], data["class_names"], cv=data.get("cv", {}), **drawn)
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

"""Images to predict on: a file, a folder (recursive) or a glob, read so that one bad image never stops a run."""

from __future__ import annotations

import glob
import logging
import os
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import Dataset

from retrain.artifacts.metadata import Preprocessing
from retrain.data.images import check_image, has_image_extension, open_rgb
from retrain.errors import DataError
from retrain.inference.tta import tta_transform

log = logging.getLogger("retrain")


def find_images(spec: str) -> list[Path]:
    """Expand PATH: an image file, every image under a folder (recursive), or every file a glob matches."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = _folder_images(path)
        if not found:
            raise DataError(
                f"input={spec} is a folder with no images in it or below it. Expected image files ("
                "jpg, png, ...). Fix: point input= to a folder of images, an image, or a glob like 'DIR/*.jpg'."
            )
        return sorted(found)
    if glob.has_magic(spec):
        # A glob names files explicitly, so a matched non-image becomes an error row rather than vanishing.
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
        if matches:
            return matches
        raise DataError(f"input={spec} matched no files. Fix: check the pattern (quote it so the shell keeps it).")
    raise DataError(
        f"input={spec} does not exist. Expected an image file, a folder of images or a glob such as "
        "'photos/**/*.jpg'. Fix: correct the path."
    )


def _folder_images(root: Path) -> list[Path]:
    """Every image under `root`, following links to folders but reading each real folder and file once.

    A link such as `self -> .` or `up -> ..` would otherwise repeat images or never end. Real folders are walked
    before links beside them, and an image reached by two paths is listed once, under the first in sorted order.
    """
    seen: set[str] = set()
    found: list[Path] = []
    skipped: Counter[str] = Counter()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs.sort(key=lambda name: (os.path.islink(os.path.join(folder, name)), name))
        visible = [Path(folder, name) for name in names if not name.startswith(".")]
        found.extend(path for path in visible if has_image_extension(path.name))
        skipped.update(path.suffix.lower() or path.name for path in visible if not has_image_extension(path.name))
    if skipped:  # the folder walk takes image extensions only; say what it left, as training's scan does
        kinds = ", ".join(f"{suffix} {n}" for suffix, n in skipped.most_common())
        log.warning(
            "input=%s: %d files without an image extension left out (%s). Fix: if they are images, convert them to "
            "JPEG or PNG, or name them in a glob (input='%s/**/*'), which makes each an answer or an error row.",
            root,
            sum(skipped.values()),
            kinds,
            root,
        )
    unique: dict[str, Path] = {}
    for image in sorted(found):
        unique.setdefault(os.path.realpath(image), image)
    return sorted(unique.values())


class PredictImages(Dataset):
    """(image tensor, error) per path; an unreadable image gives a blank tensor and says what is wrong with it."""

    def __init__(
        self, paths: list[Path], preprocessing: Preprocessing, fast_decode: bool = True, tta: str = "none"
    ) -> None:
        self.paths = paths
        self.transform = tta_transform(preprocessing, tta)  # tta=five_crop: the square its crops are cut from
        self.size = preprocessing.resize if tta == "five_crop" else preprocessing.crop
        self.min_size = preprocessing.resize if fast_decode else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path = self.paths[index]
        try:
            return self.transform(open_rgb(path, self.min_size)), ""
        except Exception as e:  # any decode failure belongs in this image's row, not in a traceback
            problem = check_image(path, full=True)
            detail = f"{problem[0]}: {problem[1]}" if problem else f"{type(e).__name__}: {e}"
            return torch.zeros(3, self.size, self.size), detail

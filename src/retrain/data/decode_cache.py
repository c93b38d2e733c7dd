"""A disk cache of big JPEGs' scaled-down decodes, so epochs after the first skip JPEG decoding.

Decoding even at 1/8 scale must read every coefficient of the file (23 ms for a 4000x3000 phone photo on one
core); reading back the 500x375 RGB array it produced takes well under a millisecond. So a run over phone
photos pays the decode once per image instead of once per epoch.

Decisions:
- Only images whose decoded array is no bigger than their file are kept: those are the big photos that the
  decoder shrank, where the gain is. Small JPEGs and PNGs decode quickly and would take more room as arrays.
  The cache is therefore never bigger than the data set.
- The key is the file's absolute path, size and modification time plus the decode request, so an edited or
  replaced image is decoded afresh; stale entries are only disk space (delete the folder to clear it).
- Entries are plain .npy files written to a temporary name and renamed, so loader workers and DDP ranks can
  fill the cache at the same time and no reader ever sees half an entry. An unreadable entry is decoded again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from retrain.data.images import DRAFT_MARGIN, open_rgb


class DecodedImageCache:
    """open_rgb with the result of big JPEGs kept in `directory` (see the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser().resolve()
        self.writable = True

    def entry(self, path: str | Path, min_size: int | None, margin: float) -> Path:
        """Where the decode of this file, at this request, is kept."""
        source = Path(path).resolve()
        stat = source.stat()
        key = f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}\0{min_size}\0{margin}"
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.directory / digest[:2] / f"{digest}.npy"

    def open_rgb(self, path: str | Path, min_size: int | None = None, margin: float = DRAFT_MARGIN) -> Image.Image:
        """The same picture as retrain.data.images.open_rgb, read from the cache once it has been decoded."""
        entry = self.entry(path, min_size, margin)
        if entry.exists():
            try:
                return Image.fromarray(np.load(entry, allow_pickle=False))
            except (OSError, ValueError, EOFError):  # a damaged entry: decode again and replace it
                pass
        img = open_rgb(path, min_size, margin)
        if self.writable and img.width * img.height * 3 <= os.path.getsize(path):
            try:
                self._write(entry, np.asarray(img))
            except OSError as e:  # a full or read-only disk costs speed, never the run
                self.writable = False
                warnings.warn(
                    f"data.decode_cache: cannot write to {self.directory} ({e}); decoding every time", stacklevel=2
                )
        return img

    def _write(self, entry: Path, pixels: np.ndarray) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, pixels, allow_pickle=False)
            os.replace(tmp, entry)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

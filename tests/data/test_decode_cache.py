"""data.decode_cache: later epochs read big photos' scaled-down decodes back, with exactly the same pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _synthetic import photo, save
from clitools import composed

import retrain.data.decode_cache as decode_cache
from retrain.data.decode_cache import DecodedImageCache
from retrain.data.splits import DataSplits
from retrain.tasks.common import make_datamodule


def entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("*.npy"))


def no_decoding(*args: object, **kwargs: object) -> None:
    raise AssertionError("decoded the file although its cached decode was there")


@pytest.fixture
def folder(tmp_path: Path) -> DataSplits:
    """A big phone-like JPEG (worth caching) and a small web photo (not) in each split of one class."""
    big = save(photo(1600, 1200, seed=1), tmp_path / "data" / "c" / "big.jpg")
    small = save(photo(200, 150, seed=2), tmp_path / "data" / "c" / "small.jpg")
    samples = [(str(big), 0), (str(small), 0)]
    return DataSplits(tmp_path / "data", "split", ["c"], {"train": samples, "val": samples})


def test_the_configured_cache_gives_the_uncached_tensors_and_is_read_on_later_epochs(
    tmp_path: Path, folder: DataSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "decoded"
    common = (f"data.root={folder.root}", "data.image_size=32", "data.augment=none")
    cached = make_datamodule(folder, composed(tmp_path, *common, f"data.decode_cache={cache_dir}").data).dataset("val")
    plain = make_datamodule(folder, composed(tmp_path, *common).data)
    reference = [plain.dataset("val")[i][0] for i in range(2)]

    first = [cached[i][0] for i in range(2)]
    assert len(entries(cache_dir)) == 1  # the big photo only: the small one decodes faster than it reads back
    monkeypatch.setattr(decode_cache, "open_rgb", no_decoding)
    second = cached[0][0]
    for ours, theirs in zip([*first, second], [*reference, reference[0]], strict=True):
        assert torch.equal(ours, theirs)


def test_an_edited_image_is_decoded_afresh(tmp_path: Path) -> None:
    path = save(photo(1600, 1200, seed=1), tmp_path / "img.jpg")
    cache = DecodedImageCache(tmp_path / "decoded")
    before = np.asarray(cache.open_rgb(path, 64))
    save(photo(1600, 1200, seed=7), path)  # same path, new pixels (and a new size and mtime)
    after = np.asarray(cache.open_rgb(path, 64))
    assert not np.array_equal(before, after)
    assert len(entries(tmp_path / "decoded")) == 2


def test_a_damaged_entry_is_decoded_again_and_replaced(tmp_path: Path) -> None:
    path = save(photo(1600, 1200, seed=1), tmp_path / "img.jpg")
    cache = DecodedImageCache(tmp_path / "decoded")
    good = np.asarray(cache.open_rgb(path, 64))
    [entry] = entries(tmp_path / "decoded")
    entry.write_bytes(entry.read_bytes()[:100])  # cut off, as a full disk or a killed copy would leave it
    assert np.array_equal(np.asarray(cache.open_rgb(path, 64)), good)
    assert np.array_equal(np.load(entry), good)


def test_an_unwritable_cache_warns_once_and_training_goes_on(tmp_path: Path) -> None:
    path = save(photo(1600, 1200, seed=1), tmp_path / "img.jpg")
    blocker = tmp_path / "decoded"
    blocker.write_text("a file where the cache folder should be")
    cache = DecodedImageCache(blocker)
    with pytest.warns(UserWarning, match="cannot write"):
        first = np.asarray(cache.open_rgb(path, 64))
    assert np.array_equal(np.asarray(cache.open_rgb(path, 64)), first)  # no second warning, same pixels

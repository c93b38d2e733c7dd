"""Which split eval scores, and a clear refusal when it holds no image (a k-fold refit's val is empty)."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrain.data.splits import DataSplits
from retrain.errors import DataError
from retrain.tasks.eval import scored_split


def _splits(**sizes: int) -> DataSplits:
    samples = {name: [(f"/d/{name}/{i}.png", 0) for i in range(n)] for name, n in sizes.items()}
    return DataSplits(Path("/d"), "split", ["cat"], samples)


def test_test_is_scored_where_there_is_one_else_val() -> None:
    assert scored_split(_splits(train=4, val=2, test=2), None, "m@v1") == "test"
    assert scored_split(_splits(train=4, val=2), None, "m@v1") == "val"
    assert scored_split(_splits(train=4, val=2, test=2), "val", "m@v1") == "val"
    with pytest.raises(DataError, match=r"has no 'test' split; it has \['train', 'val'\]. Fix: e.g. split=val"):
        scored_split(_splits(train=4, val=2), "test", "m@v1")


def test_an_empty_split_is_refused_instead_of_an_index_error() -> None:
    # A k-fold refit trains on the whole pool: eval on a folder without test/ fell back to its empty val and
    # crashed with "IndexError: list index out of range".
    with pytest.raises(DataError) as info:
        scored_split(_splits(train=6, val=0), None, "cv@v1")
    assert "The val split of /d holds no image, so cv@v1 has nothing to be scored on" in str(info.value)
    assert "Fix: data.root=DIR with held-out images in DIR/test/<class>/" in str(info.value)

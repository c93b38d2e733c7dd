"""Training starts with a summary of its data and a warning for each thing that would otherwise pass in silence."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from clitools import REPO, make_imagefolder, write_image
from omegaconf import DictConfig, OmegaConf

from retrain.data.splits import discover
from retrain.data.summary import summarize, weights_origin
from retrain.data.validate import scan
from retrain.errors import ConfigError
from retrain.tasks.common import prepare_splits


def data_config(root: Path, **overrides: object) -> DictConfig:
    """The real conf/data/imagefolder.yaml pointed at `root`."""
    cfg = OmegaConf.load(REPO / "conf" / "data" / "imagefolder.yaml")
    cfg.merge_with({"root": str(root), **overrides})
    assert isinstance(cfg, DictConfig)
    return cfg


def test_summary_gives_counts_sizes_balance_and_duplicates(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "flat", layout="folder", per_class=5, classes=("cat", "dog"))
    splits = discover(root, val_fraction=0.2, test_fraction=0.2)
    summary = summarize(splits, scan(root))
    assert summary.lines() == [
        f"Dataset {root} (folder layout: data.val_fraction=0.2, data.test_fraction=0.2, data.split_seed=0)",
        "  class   train     val    test",
        "  cat         6       2       2",
        "  dog         6       2       2",
        "  total      12       4       4",
        "Image sizes: 40x40 px (from the headers)",
        "Imbalance: 1.0 (every class has 6 images in train)",
    ]
    assert summary.warnings == []
    for i in (1, 2):
        shutil.copyfile(root / "cat" / f"00{i}.jpg", root / "cat" / f"twin{i}.jpg")
    lines = summarize(discover(root, val_fraction=0.2, test_fraction=0.2)).lines()
    assert "Duplicates: 2 groups of byte-identical files (4 files), each kept in one split" in lines
    assert "Image sizes: not read" in lines  # no scan report: data.validate=off
    assert any(line.startswith("Imbalance: 1.") and "largest/smallest class in train: cat" in line for line in lines)


@pytest.fixture
def lopsided(tmp_path: Path) -> Path:
    """A folder with one of everything the summary warns about."""
    root = make_imagefolder(tmp_path / "lopsided", layout="folder", per_class=6, classes=("cat", "dog"))
    make_imagefolder(root / "birds", layout="folder", per_class=1, classes=("crow", "jay"))  # a class of classes
    write_image(root / "owl" / "only.jpg", 2, np.random.default_rng(0))
    (root / "cat" / "anim.gif").write_bytes(b"GIF89a")
    (root / "dog" / "phone.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    (root / "dog" / "b.gif").write_bytes(b"GIF89a")
    os.symlink("..", root / "cat" / "loop")
    return root


def test_warnings_for_small_absent_nested_skipped_looping_and_lopsided_classes(lopsided: Path) -> None:
    warnings = summarize(discover(lopsided)).warnings
    assert len(warnings) == 7
    few, no_val, no_test, nested, skipped, loop, imbalance = warnings
    assert few.startswith("Classes with fewer than 2 training images: owl 1.")
    assert no_val.startswith("val has no images of birds, owl, so val/acc never scores them.")
    assert "with data.val_fraction=0.1 a class needs at least 6 for one to go to val" in no_val
    assert no_test.startswith("test has no images of birds, owl, so test/acc never scores them.")
    assert f"data.root={lopsided} may be one level too high" in nested
    assert "(birds/ holds only the folders crow, jay)" in nested and f"data.root={lopsided / 'birds'}" in nested
    assert skipped.startswith("3 image files skipped: the loader does not read their format (.gif 2, .heic 1;")
    assert loop.startswith("1 linked folder not followed") and "cat/loop: a link to the data folder" in loop
    assert imbalance.startswith("The largest class in train (cat, 10 images) has 10.0x the images of the smallest")
    assert "model.class_weights=balanced" in imbalance and "data.sampler=balanced" in imbalance
    assert all("Fix: " in text for text in warnings)


def test_prepare_splits_logs_the_summary_then_the_warnings(lopsided: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="retrain"):
        splits, bad = prepare_splits(data_config(lopsided))
    assert bad == [] and splits.class_names == ["birds", "cat", "dog", "owl"]
    records = [r for r in caplog.records if r.name == "retrain"]
    assert records[0].levelno == logging.INFO
    assert records[0].getMessage().startswith(f"Dataset {lopsided} (folder layout")
    assert "  owl         1       0       0" in records[0].getMessage()
    assert "Image sizes: 40x40 px (from the headers)" in records[0].getMessage()
    warned = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warned) == 7 and "skipped" in warned[4]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="retrain"):
        prepare_splits(data_config(lopsided, validate="off"))
    assert "Image sizes: not read" in caplog.records[0].getMessage()


def test_weights_origin_says_random_source_or_resume() -> None:
    assert weights_origin(None).startswith("random (model.init_from=null); model.init_from=IMAGENET1K_V1")
    assert weights_origin("IMAGENET1K_V1") == "from IMAGENET1K_V1 (model.init_from)"
    assert weights_origin("cats@v2", resumed_from="runs/x/last.ckpt") == "resumed from runs/x/last.ckpt"


def test_a_long_class_list_shows_the_smallest_and_largest_classes(tmp_path: Path) -> None:
    classes = tuple(f"c{i:02d}" for i in range(25))
    root = make_imagefolder(tmp_path / "many", layout="folder", per_class=2, classes=classes)
    for i in range(6):  # c24 becomes the largest class
        write_image(root / "c24" / f"extra{i}.jpg", 0, np.random.default_rng(i))
    table = summarize(discover(root)).lines()[1:18]
    assert table[0].split() == ["class", "train", "val", "test"]
    assert [row.split()[0] for row in table[1:11]] == [f"c{i:02d}" for i in range(10)]
    assert table[11] == "  ... 10 classes not shown"
    assert [row.split()[0] for row in table[12:17]] == ["c20", "c21", "c22", "c23", "c24"]


def test_copies_of_train_images_in_val_are_warned_about_and_share_a_fold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # DIR/train + DIR/val with 4 train images copied into val/: `retrain validate` saw the leak, but training said
    # nothing, and k-fold CV put each copy in another fold than its original (a val image trained its own fold).
    root = make_imagefolder(tmp_path / "split", per_class=8)
    originals = sorted((root / "train" / "cat").iterdir())[:4]
    for i, original in enumerate(originals):
        shutil.copy(original, root / "val" / "cat" / f"dup_{i}{original.suffix}")
    with caplog.at_level(logging.WARNING, logger="retrain"):
        prepare_splits(data_config(root))
    assert "4 images in a held-out split have the same bytes as an image of an earlier split" in caplog.text
    for fold in range(3):
        splits, _ = prepare_splits(data_config(root, fold=fold, folds=3))
        train = {Path(p).read_bytes() for p, _ in splits.samples["train"]}
        assert not [p for p, _ in splits.samples["val"] if Path(p).read_bytes() in train], f"fold {fold} leaks"


def test_group_by_says_where_groups_are_not_kept_whole(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Without CV data.group_by was ignored in silence; with CV the flat test split still split patients.
    root = make_imagefolder(tmp_path / "flat", layout="folder", per_class=8)
    pattern = r"\d\d(\d)"
    with caplog.at_level(logging.WARNING, logger="retrain"):
        prepare_splits(data_config(root, group_by=pattern))
    assert "groups images for k-fold CV only (experiment=cv)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retrain"):
        prepare_splits(data_config(root, group_by=pattern, fold=0, folds=2))
    assert "but the test split of" in caplog.text and "data.test_fraction=0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retrain"):
        prepare_splits(data_config(root, group_by=pattern, fold=0, folds=2, test_fraction=0.0))
    assert "group_by" not in caplog.text


def test_resuming_a_fold_run_with_another_fold_is_refused(tmp_path: Path) -> None:
    # `data.fold=2 ckpt_path=last` on a fold-1 run went on training fold 1, and its results said fold 1.
    root = make_imagefolder(tmp_path / "flat", layout="folder", per_class=8)
    fold_run, _ = prepare_splits(data_config(root, fold=1, folds=3))
    recorded = fold_run.summary()
    assert prepare_splits(data_config(root, fold=1, folds=3), recorded)[0].cv["fold"] == 1
    assert prepare_splits(data_config(root), recorded)[0].cv["fold"] == 1
    with pytest.raises(ConfigError, match=r"data.fold=2, but the run being resumed trained fold 1 of 3.*Fix: data"):
        prepare_splits(data_config(root, fold=2, folds=3), recorded)

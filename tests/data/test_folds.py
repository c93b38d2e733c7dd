"""k-fold CV folds: stratified over the train pool, groups whole, the test split untouched, the same from the seed,
and recorded in split.json so a resumed fold validates on the same images."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from clitools import CLASSES, make_imagefolder

from retrain.artifacts.metadata import ArtifactMetadata
from retrain.data.folds import REFIT, assign_folds, fold_split
from retrain.data.splits import discover, load_recorded
from retrain.data.transforms import preprocessing
from retrain.errors import ConfigError, DataError
from retrain.model.loading import trained_splits


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat folder of 3 classes x 16 images, split automatically (10 % val, 10 % test)."""
    return make_imagefolder(tmp_path_factory.mktemp("flat") / "images", layout="folder", per_class=8)


def test_every_pool_image_validates_in_exactly_one_fold_with_each_class_spread_evenly(flat: Path) -> None:
    splits = discover(flat)
    pool = sorted(splits.samples["train"] + splits.samples["val"])
    folds = [fold_split(splits, k, 3, seed=0) for k in range(3)]
    held_out = [path for split in folds for path, _ in split.samples["val"]]
    assert sorted(held_out) == sorted(path for path, _ in pool)  # each pool image held out once
    for split in folds:
        assert split.samples["test"] == splits.samples["test"]  # the test split is never touched
        assert not {p for p, _ in split.samples["train"]} & {p for p, _ in split.samples["val"]}
        per_class = Counter(label for _, label in split.samples["val"])
        assert sorted(per_class.values()) == [4, 5, 5] or max(per_class.values()) - min(per_class.values()) <= 1
    refit = fold_split(splits, REFIT, 3, seed=0)
    assert sorted(refit.samples["train"]) == pool and refit.samples["val"] == []


def test_the_folds_come_from_the_seed_and_not_from_the_order_of_the_files(flat: Path) -> None:
    splits = discover(flat)
    again = discover(flat)
    again.samples["train"].reverse()
    assert fold_split(splits, 1, 3, seed=5).samples["val"] == fold_split(again, 1, 3, seed=5).samples["val"]
    assert fold_split(splits, 1, 3, seed=5).samples["val"] != fold_split(splits, 1, 3, seed=6).samples["val"]


def test_images_sharing_a_group_key_stay_in_one_fold() -> None:
    labels = [i % 2 for i in range(40)]
    groups = [f"patient{i // 4}" for i in range(40)]  # 10 patients, 4 images each, both classes
    assignment = assign_folds(labels, groups, 5, seed=0)
    for patient in set(groups):
        assert len({f for f, g in zip(assignment, groups, strict=True) if g == patient}) == 1
    assert sorted(Counter(assignment).values()) == [8] * 5


def test_group_by_takes_the_regex_group_of_the_path(flat: Path) -> None:
    splits = discover(flat)
    # The middle digit of the file name: 0 (000-009) or 1 (010-015), so every class has two groups.
    two = fold_split(splits, 0, 2, seed=0, group_by=r"/\d(\d)\d\.")
    key = {p: Path(p).name[1] for p, _ in splits.samples["train"] + splits.samples["val"]}
    val_keys = {(Path(p).parent.name, key[p]) for p, _ in two.samples["val"]}
    train_keys = {(Path(p).parent.name, key[p]) for p, _ in two.samples["train"]}
    assert not {k for _, k in val_keys} & {k for _, k in train_keys}  # a key in val is nowhere in train
    with pytest.raises(ConfigError, match="matches none of the"):
        fold_split(splits, 0, 2, seed=0, group_by=r"patient_(\d+)")
    with pytest.raises(ConfigError, match="not a regular expression"):
        fold_split(splits, 0, 2, seed=0, group_by="(")


def test_a_recorded_fold_is_reused_as_it_is(flat: Path, tmp_path: Path) -> None:
    splits = discover(flat)
    fold = fold_split(splits, 2, 3, seed=0)
    fold.save(tmp_path / "split.json")
    recorded = json.loads((tmp_path / "split.json").read_text())["cv"]
    pool = len(splits.samples["train"]) + len(splits.samples["val"])
    assert (recorded["fold"], recorded["folds"], len(recorded["assignment"])) == (2, 3, pool)
    reloaded = load_recorded(tmp_path / "split.json", flat)
    assert fold_split(reloaded, 2, 3, seed=0) is reloaded  # resume and eval see the same val images
    assert reloaded.summary()["cv"] == {"folds": 3, "seed": 0, "group_by": None, "fold": 2}


@pytest.mark.parametrize(
    ("fold", "folds", "message"), [(3, 3, "is not a fold"), (0, 1, "at least 2"), ("x", 3, "or refit")]
)
def test_a_wrong_fold_says_what_is_expected(flat: Path, fold: object, folds: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        fold_split(discover(flat), fold, folds, seed=0)


def test_more_folds_than_groups_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"Fix: lower data\.folds"):
        assign_folds([0, 1, 0, 1], ["a", "a", "b", "b"], 3, seed=0)


def test_eval_cuts_again_the_fold_a_model_records(imagefolder: Path) -> None:
    fold = fold_split(discover(imagefolder), 1, 2, seed=3)  # train/, val/, test/ folders: nothing reloads a file list
    facts = {"arch": "resnet18", "class_names": list(CLASSES), "preprocessing": preprocessing(32).to_dict()}
    meta = ArtifactMetadata.from_dict({**facts, "dataset": fold.summary()})
    again = trained_splits(meta, None, source="fold model")
    assert again.samples["val"] == fold.samples["val"] and again.samples["test"] == fold.samples["test"]

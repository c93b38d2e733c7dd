"""k-fold cross-validation over the train pool: folds stratified by class, groups kept whole, drawn from a seed.

The pool is every image outside the test split (train + val of the folder's split); the test split is never touched.
Fold k validates on its k-th part and trains on the rest; `refit` trains on the whole pool. Images that share a
group key (`data.group_by`, a regex on the path) or the same bytes land in one fold, so no patient, camera or copy
is in train and val at once. scikit-learn's StratifiedGroupKFold (StratifiedKFold without groups) draws the folds.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from retrain.data.splits import DataSplits
from retrain.errors import ConfigError, DataError

log = logging.getLogger("retrain")

REFIT = "refit"  # data.fold=refit: the whole pool trains, nothing is held out


def check_fold(fold: Any, folds: Any) -> int | str:
    """`data.fold` and `data.folds`, checked: a fold number in [0, folds) or `refit`, and at least 2 folds."""
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise ConfigError(f"data.folds={folds}; expected a whole number of folds, at least 2. Fix: data.folds=5.")
    if str(fold) == REFIT:
        return REFIT
    if not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < folds:
        raise ConfigError(
            f"data.fold={fold} is not a fold of data.folds={folds}. Expected 0 to {folds - 1}, or refit (the whole "
            f"pool). Fix: data.fold=0, or run every fold with python train.py -m experiment=cv data.folds={folds}."
        )
    return fold


def group_keys(paths: list[str], root: Path, pattern: str | None, duplicates: list[list[str]]) -> list[str]:
    """Each image's group: what `pattern` captures in its path under `root` (its first group, else the whole match);
    an image it does not match is a group of its own. Byte-identical files share their group."""
    relative = [Path(os.path.relpath(path, root)).as_posix() for path in paths]
    keys = list(relative)
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise ConfigError(
                f"data.group_by={pattern!r} is not a regular expression ({error}). Expected a pattern whose first "
                r"""group is the group key, e.g. "data.group_by='patient_(\d+)'" on the command line, quoted """
                "whole so that the shell keeps the quotes Hydra needs. Fix: correct the pattern."
            ) from None
        matches = [regex.search(rel) for rel in relative]
        unmatched = [rel for rel, match in zip(relative, matches, strict=True) if match is None]
        if len(unmatched) == len(relative):
            raise ConfigError(
                f"data.group_by={pattern!r} matches none of the {len(relative)} image paths (e.g. {relative[0]}). "
                r"Expected a pattern found in the path under data.root, e.g. 'patient_(\d+)'. Fix: correct it."
            )
        if unmatched:
            log.warning(
                "data.group_by=%r does not match %d of %d images (e.g. %s): each of those is a group of its own",
                pattern, len(unmatched), len(relative), unmatched[0],
            )  # fmt: skip
        keys = [
            rel if match is None else f"group:{match.group(1) if regex.groups else match.group(0)}"
            for rel, match in zip(relative, matches, strict=True)
        ]
    index = {path: i for i, path in enumerate(paths)}
    for same in duplicates:  # identical files follow the first one's group
        members = [index[path] for path in same if path in index]
        for i in members[1:]:
            keys[i] = keys[members[0]]
    return keys


def assign_folds(labels: list[int], groups: list[str], folds: int, seed: int) -> list[int]:
    """The fold of each image: stratified by label, every group in one fold, the same for the same inputs."""
    # scikit-learn here: eval and predict read fold models through model/loading.py without paying for its import.
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(labels)
    x = np.zeros(len(labels))
    whole = len(set(groups)) < len(groups)
    splitter = (
        StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
        if whole
        else StratifiedKFold(folds, shuffle=True, random_state=seed)
    )
    out = [-1] * len(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a class smaller than the fold count: check_class_sizes says it
        try:
            for fold, (_, held_out) in enumerate(splitter.split(x, y, groups=groups)):
                for i in held_out:
                    out[i] = fold
        except ValueError as error:
            reason = str(error).rstrip(".")
            raise DataError(
                f"The train pool cannot be cut into data.folds={folds} folds: {reason}. Expected at least {folds} "
                "images (or groups, with data.group_by) per class. Fix: lower data.folds, or group less coarsely."
            ) from None
    return out


def fold_split(splits: DataSplits, fold: Any, folds: Any, seed: int, group_by: str | None = None) -> DataSplits:
    """The split of one fold: its part of the pool validates, the rest trains; `refit` trains on the whole pool.

    A split that already records this fold (a resumed run's split.json) is kept as recorded.
    """
    fold = check_fold(fold, folds)
    wanted = {"folds": folds, "seed": seed, "group_by": group_by}
    if splits.cv and {k: splits.cv.get(k) for k in wanted} == wanted and splits.cv.get("fold") == fold:
        return splits
    pool = sorted(splits.samples.get("train", []) + splits.samples.get("val", []))
    paths, labels = [path for path, _ in pool], [label for _, label in pool]
    assignment = assign_folds(labels, group_keys(paths, splits.root, group_by, splits.duplicates), folds, seed)
    _check_class_sizes(splits.class_names, labels, folds)
    samples = dict(splits.samples)
    samples["train"] = [s for s, f in zip(pool, assignment, strict=True) if fold == REFIT or f != fold]
    samples["val"] = [s for s, f in zip(pool, assignment, strict=True) if fold != REFIT and f == fold]
    relative = {os.path.relpath(path, splits.root): f for path, f in zip(paths, assignment, strict=True)}
    return replace(splits, samples=samples, cv={**wanted, "fold": fold, "assignment": relative})


def as_recorded(splits: DataSplits, recorded: Mapping[str, Any] | None) -> DataSplits:
    """The fold an artifact records in its dataset facts (`cv`), cut again: the one a resumed or evaluated fold
    model validated on; `splits` unchanged for a model that was not trained on a fold."""
    cv = (recorded or {}).get("cv") or {}
    if not cv:
        return splits
    return fold_split(splits, cv["fold"], cv["folds"], int(cv["seed"]), cv.get("group_by"))


def _check_class_sizes(class_names: list[str], labels: list[int], folds: int) -> None:
    counts = np.bincount(np.asarray(labels), minlength=len(class_names))
    small = [f"{name} ({count})" for name, count in zip(class_names, counts, strict=True) if count < folds]
    if small:
        log.warning(
            "data.folds=%d: the classes %s have fewer images in the pool than folds, so some folds validate "
            "without them", folds, ", ".join(small),
        )  # fmt: skip

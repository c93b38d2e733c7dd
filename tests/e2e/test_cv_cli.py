"""k-fold cross-validation as a user runs it: `python train.py experiment=cv ... cv.refit=true` (-m optional).

One sweep of 2 folds and the refit, grouped by file number and marked not mirrorable, each job in 2 DDP
processes: the sweep folder holds cv_summary.*, oof_predictions.csv (every train-pool image once, predicted by the
fold that held it out) and its report; the registry holds one version, the refit's, with the CV mean and std and
the fold runs in its metadata.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from clitools import FAST, assert_ok, run_cli

pytestmark = pytest.mark.e2e

GROUP_BY = r"/(\d\d\d)\."  # the file number: train/cat/000.png and val/dog/000.png share a fold


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cv_sweep_summarizes_predicts_every_pool_image_once_and_publishes_the_refit(
    tmp_path: Path, imagefolder: Path
) -> None:
    # Each fold, and the refit, trains in 2 DDP processes: a user's trainer.devices=N. No -m: experiment=cv is a
    # sweep by itself (a single run used to train fold 0 alone and publish it).
    result = run_cli(
        "train.py", "experiment=cv", f"data.root={imagefolder}", "data.folds=2", "cv.refit=true",
        f"data.group_by='{GROUP_BY}'", "data.hflip=false", *FAST, "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "trainer=ddp_cpu", "trainer.devices=2", cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert_ok(result)
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").glob("*/*")

    summary = _read_csv(sweep / "cv_summary.csv")
    assert [row["fold"] for row in summary] == ["0", "1", "mean", "std"]
    values = [float(row["value"]) for row in summary[:2]]
    assert float(summary[2]["value"]) == pytest.approx(sum(values) / 2)
    assert "[cv_summary.md](cv_summary.md)" in (sweep / "sweep_summary.md").read_text()
    assert "± " in (sweep / "cv_summary.md").read_text()

    pool = sorted(str(p) for split in ("train", "val") for p in (imagefolder / split).rglob("*.*"))
    oof = _read_csv(sweep / "oof_predictions.csv")
    assert sorted(row["path"] for row in oof) == pool  # one row per train-pool image; test images never
    fold_of: dict[str, str] = {}
    for fold in ("0", "1"):
        samples = json.loads((sweep / fold / "split.json").read_text())["samples"]
        val = {str(imagefolder / rel) for rel, _ in samples["val"]}
        assert not val & {str(imagefolder / rel) for rel, _ in samples["train"]}
        fold_of.update(dict.fromkeys(val, fold))
    for row in oof:  # predicted by the one fold model that did not train on it
        assert fold_of[row["path"]] == row["fold"]
        probs = {key.removeprefix("prob_"): float(v) for key, v in row.items() if key.startswith("prob_")}
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4) and row["predicted"] == max(probs, key=probs.get)
    keys = {}
    for row in oof:  # data.group_by: a file number is in one fold only
        key = re.search(GROUP_BY, row["path"]).group(1)  # type: ignore[union-attr]
        assert keys.setdefault(key, row["fold"]) == row["fold"]
    assert (sweep / "oof_report" / "report.md").is_file() and (sweep / "oof_report" / "confusion_matrix.png").is_file()

    (version,) = (tmp_path / "models").glob("*/v*")  # the fold runs published nothing; the refit did
    meta = json.loads((version / "metadata.json").read_text())
    cv = meta["cv"]
    assert (cv["folds"], cv["monitor"]) == (2, "val/acc")
    assert cv["mean"] == pytest.approx(float(summary[2]["value"])) and cv["std"] == pytest.approx(
        float(summary[3]["value"])
    )
    assert cv["fold_runs"] == [str(sweep / "0"), str(sweep / "1")]
    assert meta["dataset"]["split_sizes"]["train"] == len(pool) and meta["dataset"]["split_sizes"]["val"] == 0
    assert meta["preprocessing"]["hflip"] is False  # data.hflip=false travels with the model
    assert json.loads((sweep / "refit" / "results.json").read_text())["epochs"] == cv["refit_epochs"]

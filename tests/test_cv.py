"""The end of a CV sweep (retrain.cv) from job folders, without training: one fold per job, no other swept key, and
a refit only when every fold finished."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from clitools import REPO
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from test_sweeps import make_job

from retrain import cv
from retrain.cv import CVSummary, read_folds, refit_command, refit_record, summarize, write_summary
from retrain.utils.hydra import register_resolvers


def composed_sweep(tmp_path: Path, *overrides: str) -> DictConfig:
    """conf/train.yaml with experiment=cv as Hydra composes it for a sweep, writing under tmp_path."""
    register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", [f"paths.root_dir={tmp_path}", "experiment=cv", *overrides], return_hydra_config=True)


def fold_result(fold: int, value: float) -> dict[str, Any]:
    return {
        "status": "ok",
        "monitor": "val/acc",
        "monitor_mode": "max",
        "monitor_value": value,
        "best_epoch": 1,
        "cv": {"fold": fold, "folds": 3},
    }


def end_config(sweep: Path, *, refit: bool, folds: int = 3) -> DictConfig:
    """The parts of the sweep's config that CVSummary reads at the end."""
    return OmegaConf.create(
        {
            "task_name": "train",
            "data": {"folds": folds},
            "cv": {"refit": refit},
            "callbacks": {},
            "hydra": {"sweep": {"dir": str(sweep)}, "overrides": {"task": ["experiment=cv", "data.root=/images"]}},
        }
    )


def test_experiment_cv_is_a_sweep_of_its_folds_without_dash_m_and_its_refit_a_single_run(tmp_path: Path) -> None:
    cfg = composed_sweep(tmp_path)
    assert cfg.hydra.mode == RunMode.MULTIRUN  # a single run would train fold 0 and publish it
    command = refit_command(cfg, tmp_path, epochs=3, has_test=True)
    assert "hydra.mode=RUN" in command and "data.fold=refit" in command


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["model.lr=0.05,0.001"], "experiment=cv also sweeps model.lr=0.05,0.001"),
        (["model/optimizer=sgd,adamw"], "experiment=cv also sweeps model/optimizer=sgd,adamw"),
        (["hparams_search=optuna"], "it would sample data.fold as one more hyperparameter"),
    ],
)
def test_a_cv_that_would_mix_settings_stops_before_any_fold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], says: str
) -> None:
    cfg = composed_sweep(tmp_path, *(o for o in overrides if "," not in o))
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.overrides.task = ["experiment=cv", *overrides]
    with pytest.raises(SystemExit, match="1"):
        CVSummary().on_multirun_start(cfg)
    error = capsys.readouterr().err
    assert (
        says in error
        and "Fix: run one CV per setting" in error
        and "hparams_search=optuna over one fixed fold" in error
    )


def test_a_sweep_of_the_folds_alone_starts(tmp_path: Path) -> None:
    cfg = composed_sweep(tmp_path)
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.overrides.task = ["experiment=cv", "data.fold=0,1", "data.root=/images"]
    CVSummary().on_multirun_start(cfg)  # no SystemExit


def test_a_fold_run_twice_is_not_summarized_as_one_cv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for num, (fold, lr) in enumerate([(0, "0.05"), (1, "0.05"), (0, "0.001"), (1, "0.001")]):
        make_job(tmp_path, num, [f"data.fold={fold}", f"model.lr={lr}"], fold_result(fold, 0.5))
    with pytest.raises(SystemExit, match="1"):
        CVSummary().on_multirun_end(end_config(tmp_path, refit=False, folds=2))
    error = capsys.readouterr().err
    assert "ran a fold more than once (fold 0 in jobs 0, 2; fold 1 in jobs 1, 3)" in error
    assert "Fix: run one CV per setting" in error
    assert not (tmp_path / "cv_summary.json").exists()


def test_a_failed_fold_stops_the_refit_and_names_its_fold_and_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cv.subprocess, "run", lambda *a, **k: pytest.fail("the refit ran"))
    make_job(tmp_path, 0, ["data.fold=0"], fold_result(0, 0.5))
    make_job(tmp_path, 1, ["data.fold=1"], fold_result(1, 0.7))
    make_job(tmp_path, 2, ["data.fold=7"], {"status": "failed", "error": "DataError: data.fold=7 is not a fold"})
    with pytest.raises(SystemExit, match="1"):
        CVSummary().on_multirun_end(end_config(tmp_path, refit=True))
    error = capsys.readouterr().err
    assert "cv.refit=true, but 2 of 3 folds finished, so the refit was not trained" in error
    assert f"fold 7 failed (log: {tmp_path / '2' / 'train.log'}): DataError: data.fold=7 is not a fold" in error
    assert "fold 2 did not run" in error
    summary = json.loads((tmp_path / "cv_summary.json").read_text())
    assert [row["fold"] for row in summary["rows"]] == [0, 1, 7]  # the failed job by its fold, not its number


def test_the_refit_record_counts_the_finished_folds(tmp_path: Path) -> None:
    make_job(tmp_path, 0, ["data.fold=0"], fold_result(0, 0.5))
    make_job(tmp_path, 1, ["data.fold=1"], fold_result(1, 0.7))
    write_summary(tmp_path, summarize(tmp_path, read_folds(tmp_path), folds=2))
    record = refit_record(tmp_path)
    assert (record["folds"], record["finished"]) == (2, 2)
    assert record["mean"] == pytest.approx(0.6)

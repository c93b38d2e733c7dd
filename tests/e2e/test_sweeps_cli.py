"""Sweeps as a user runs them: summaries, failed jobs, fail_fast, DDP jobs, submitit and a resumed Optuna search."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from clitools import FAST, assert_ok, run_cli

from retrain.artifacts.registry import list_versions

pytestmark = pytest.mark.e2e
# One short epoch per job, no test pass and no registry version: the sweep machinery is what is under test.
QUICK = (
    *FAST,
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "test=false",
    "save.publish=false",
    "~callbacks.report",  # ~1-2 s of CPU a job; the report is tested where it is the subject (test_loggers_cli)
)


def sweep_dirs(cwd: Path) -> list[Path]:
    """Every sweep dir of runs named resnet18, oldest first."""
    return sorted((cwd / "logs" / "train" / "multiruns" / "resnet18").iterdir())


def numbered(sweep_dir: Path) -> list[str]:
    return sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())


def summary_rows(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "sweep_summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def failed_job_sweep(tmp_path_factory: pytest.TempPathFactory, imagefolder: Path):
    """Two jobs through the submitit local executor (the SLURM launcher's code path); the second has a bad lr."""
    cwd = tmp_path_factory.mktemp("sweep")
    result = run_cli(
        "train.py", "-m", "hydra/launcher=submitit_local", "model.lr=0.01,-1", f"data.root={imagefolder}", *QUICK,
        cwd=cwd,
    )  # fmt: skip
    assert_ok(result)  # a failed job does not fail the sweep
    return result


def test_a_failed_job_is_recorded_and_the_other_job_still_runs(failed_job_sweep) -> None:
    (sweep,) = sweep_dirs(failed_job_sweep.cwd)
    assert numbered(sweep) == ["0", "1"]
    assert (sweep / ".submitit").is_dir()  # the jobs ran through submitit, not the basic launcher
    ok, failed = summary_rows(sweep)
    assert (ok["job"], ok["status"], ok["best"], ok["monitor"]) == ("0", "ok", "true", "val/acc")
    assert 0.0 <= float(ok["value"]) <= 1.0 and ok["best_epoch"] == "0"
    assert ok["overrides"] == "model.lr=0.01" and ok["run_dir"] == str(sweep / "0")
    assert (failed["status"], failed["best"], failed["value"]) == ("failed", "false", "")
    assert failed["overrides"] == "model.lr=-1" and "lr" in failed["error"] and "-1" in failed["error"]
    assert json.loads((sweep / "1" / "results.json").read_text())["status"] == "failed"
    markdown = (sweep / "sweep_summary.md").read_text()
    assert "| **0 (best)** | ok |" in markdown and "2 jobs (1 ok, 1 failed); best: job 0" in markdown
    assert "sweep summary:" in failed_job_sweep.output


def test_summarize_rebuilds_the_summary_from_the_job_dirs(failed_job_sweep) -> None:
    (sweep,) = sweep_dirs(failed_job_sweep.cwd)
    written = {name: (sweep / name).read_text() for name in ("sweep_summary.csv", "sweep_summary.md")}
    for name in written:
        (sweep / name).unlink()
    rebuilt = subprocess.run(
        [sys.executable, "-m", "retrain.sweeps", "summarize", str(sweep)], capture_output=True, text=True, timeout=60
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert {name: (sweep / name).read_text() for name in written} == written
    assert "| **0 (best)** |" in rebuilt.stdout


def test_fail_fast_stops_the_sweep_at_the_failed_job(tmp_path: Path, imagefolder: Path) -> None:
    result = run_cli(
        "train.py", "-m", "model.lr=-1,0.01", "sweep.fail_fast=true", f"data.root={imagefolder}", *QUICK, cwd=tmp_path
    )
    assert result.returncode != 0
    assert "sweep.fail_fast=true stopped the sweep" in result.output
    (sweep,) = sweep_dirs(tmp_path)
    assert numbered(sweep) == ["0"]  # job 1 never started
    assert [row["status"] for row in summary_rows(sweep)] == ["failed"]


def test_ddp_jobs_in_a_multirun_each_leave_one_job_dir_with_one_set_of_checkpoints(
    tmp_path: Path, imagefolder: Path
) -> None:
    result = run_cli(
        "train.py", "-m", "trainer=ddp_cpu", "trainer.devices=2", "model.lr=0.1,0.01", f"data.root={imagefolder}",
        *QUICK, cwd=tmp_path, timeout=400,
    )  # fmt: skip
    assert_ok(result)
    logs = tmp_path / "logs" / "train"
    assert [p.name for p in logs.iterdir()] == ["multiruns"]  # no stray single-run folder from the second rank
    (sweep,) = sweep_dirs(tmp_path)
    assert numbered(sweep) == ["0", "1"]
    for job, lr in (("0", 0.1), ("1", 0.01)):
        assert yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())["model"]["lr"] == lr
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["status"] == "ok" and Path(results["run_dir"]) == sweep / job
        checkpoints = {p.name for p in (sweep / job / "checkpoints").rglob("*.ckpt")}
        assert checkpoints == {Path(results["best_checkpoint"]).name, "last.ckpt"}
    assert len(list(sweep.rglob("*.ckpt"))) == 4
    assert [row["status"] for row in summary_rows(sweep)] == ["ok", "ok"]


def test_an_optuna_search_resumes_its_study_and_records_failed_trials(tmp_path: Path, imagefolder: Path) -> None:
    with warnings.catch_warnings():  # optuna 2.10 warns about SQLAlchemy 2.0, which the `sweep` extra rules out
        warnings.simplefilter("ignore")
        import optuna

    search = ("hparams_search=optuna", f"data.root={imagefolder}", *QUICK)
    publishing = [o for o in search if o != "save.publish=false"]  # sweep.publish=best: only the best trial
    first = run_cli("train.py", *publishing, "hparams_search.n_trials=3", cwd=tmp_path)
    assert_ok(first)
    (first_dir,) = sweep_dirs(tmp_path)
    study_file = first_dir / "optuna.db"
    assert study_file.is_file() and numbered(first_dir) == ["0", "1", "2"]
    best_job = max(summary_rows(first_dir), key=lambda row: float(row["value"]))["job"]
    assert [row["version"] for row in list_versions(tmp_path / "models")] == [1]  # not one version per trial
    version = tmp_path / "models" / "resnet18" / "v001"
    assert json.loads((version / "results.json").read_text())["run_dir"] == str(first_dir / best_job)
    assert json.loads((first_dir / best_job / "results.json").read_text())["registry"]["path"] == str(version)
    assert not list(first_dir.rglob("kept_for_sweep"))  # the other trials' kept models are gone

    # The resumed search continues the same study; a bad lr makes both new trials fail, and the search goes on.
    second = run_cli(
        "train.py", *search, "hparams_search.n_trials=2", "hparams_search.resume=true", "model.lr=-1", cwd=tmp_path
    )
    assert second.returncode == 1 and "error: no job of the sweep succeeded (2 jobs" in second.output  # none trained
    first_dir_again, second_dir = sweep_dirs(tmp_path)
    assert first_dir_again == first_dir and not (second_dir / "optuna.db").exists()

    study = optuna.load_study(study_name="resnet18", storage=f"sqlite:///{study_file}")
    states = [trial.state.name for trial in study.trials]
    assert states == ["COMPLETE"] * 3 + ["FAIL"] * 2
    assert {"model.lr", "model.weight_decay", "model.freeze", "data.augment"} <= set(study.trials[0].params)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE  # monitor_mode=max
    best = yaml.safe_load((second_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(trial.value for trial in study.trials[:3])
    assert [row["status"] for row in summary_rows(second_dir)] == ["failed", "failed"]

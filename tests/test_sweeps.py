"""Sweep summaries, the Optuna study location, fail_fast, and the search and SLURM configs, without training."""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import submitit
import torch
from clitools import REPO
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from submitit.slurm.slurm import SlurmExecutor

from retrain.artifacts.publish import has_kept, keep_for_sweep
from retrain.artifacts.sources import load_source
from retrain.cli.main import main as retrain_cli
from retrain.errors import ConfigError
from retrain.sweeps import SweepSummary, write_summary
from retrain.utils.hydra import register_resolvers, study_storage


def make_job(sweep: Path, num: int, overrides: list[str], results: dict[str, Any] | None) -> Path:
    """A job dir as Hydra and train.py leave it: .hydra/overrides.yaml and (unless None) results.json."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))
    return job


def ok(value: float, epoch: int = 1, mode: str = "max") -> dict[str, Any]:
    return {"status": "ok", "monitor": "val/acc", "monitor_mode": mode, "monitor_value": value, "best_epoch": epoch}


def rows(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "sweep_summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_summary_has_one_row_per_job_and_marks_the_best(tmp_path: Path) -> None:
    shared = "data.root=/images"
    make_job(tmp_path, 0, [shared, "model.lr=0.1"], ok(0.5, epoch=3))
    make_job(tmp_path, 1, [shared, "model.lr=-1"], {"status": "failed", "error": "ConfigError: lr: got -1"})
    make_job(tmp_path, 2, [shared, "model.lr=0.01"], ok(0.75, epoch=4))
    make_job(tmp_path, 10, [shared, "model.lr=0.001"], None)  # killed before it wrote results.json
    csv_path, md_path = write_summary(tmp_path)

    table = rows(tmp_path)
    assert [r["job"] for r in table] == ["0", "1", "2", "10"]  # numeric order, not 0, 1, 10, 2
    assert [r["status"] for r in table] == ["ok", "failed", "ok", "missing"]
    assert [r["best"] for r in table] == ["false", "false", "true", "false"]
    assert [r["overrides"] for r in table] == ["model.lr=0.1", "model.lr=-1", "model.lr=0.01", "model.lr=0.001"]
    assert (table[2]["value"], table[2]["best_epoch"], table[2]["monitor"]) == ("0.75", "4", "val/acc")
    assert table[1]["error"] == "ConfigError: lr: got -1" and table[1]["value"] == ""
    assert table[0]["run_dir"] == str(tmp_path / "0")
    markdown = md_path.read_text()
    assert "4 jobs (2 ok, 1 failed, 1 missing); best: job 2 (val/acc = 0.7500, max)" in markdown
    assert "| **2 (best)** | ok | 0.7500 | 4 | `model.lr=0.01` | 2 |  |" in markdown
    assert csv_path == tmp_path / "sweep_summary.csv"


def test_min_mode_picks_the_lowest_value_and_a_nan_is_never_best(tmp_path: Path) -> None:
    make_job(tmp_path, 0, ["model.lr=0.1"], {**ok(0.9, mode="min"), "monitor": "val/loss"})
    make_job(tmp_path, 1, ["model.lr=0.2"], {**ok(math.nan, mode="min"), "monitor": "val/loss"})
    make_job(tmp_path, 2, ["model.lr=0.3"], {**ok(0.4, mode="min"), "monitor": "val/loss"})
    write_summary(tmp_path)
    assert [r["best"] for r in rows(tmp_path)] == ["false", "false", "true"]
    assert "| job | status | val/loss |" in (tmp_path / "sweep_summary.md").read_text()


def test_summarize_cli_rebuilds_the_files_or_names_the_wrong_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_job(tmp_path, 0, ["model.lr=0.1"], ok(0.5))
    assert retrain_cli(["sweeps", "summarize", str(tmp_path)]) == 0
    assert (tmp_path / "sweep_summary.csv").is_file() and "| **0 (best)** |" in capsys.readouterr().out
    empty = tmp_path / "not_a_sweep"
    empty.mkdir()
    assert retrain_cli(["sweeps", "summarize", str(empty)]) == 1
    error = capsys.readouterr().err
    assert str(empty) in error and "numbered job folders" in error and "Fix:" in error


def test_study_storage_is_new_in_the_sweep_dir_or_an_earlier_one_on_resume(tmp_path: Path) -> None:
    runs = tmp_path / "multiruns" / "resnet18"
    first, second, now = runs / "2026-01-01_10-00-00_1", runs / "2026-01-02_10-00-00_2", runs / "2026-01-03_1"
    acc = ("val/acc", "max")
    assert study_storage(False, str(first), *acc) == f"sqlite:///{first}/optuna.db"
    assert first.is_dir()  # SQLite would not create the folder itself
    with pytest.raises(ConfigError, match=r"hparams_search\.resume=true found no optuna\.db"):
        study_storage(True, str(now), *acc)
    for sweep in (first, second):
        sweep.mkdir(exist_ok=True)
        (sweep / "optuna.db").touch()
    assert study_storage(True, str(now), *acc) == f"sqlite:///{second}/optuna.db"  # the newest earlier study
    assert study_storage(str(first), str(now), *acc) == f"sqlite:///{first}/optuna.db"
    assert study_storage(str(first / "optuna.db"), str(now), *acc) == f"sqlite:///{first}/optuna.db"
    with pytest.raises(ConfigError, match="does not exist"):
        study_storage(str(tmp_path / "nowhere"), str(now), *acc)


def test_resuming_a_study_with_another_monitor_is_refused(tmp_path: Path) -> None:
    first, now = tmp_path / "resnet18" / "2026-01-01_1", tmp_path / "resnet18" / "2026-01-02_1"
    study_storage(False, str(first), "val/loss", "min")  # a new study records what it optimizes
    (first / "optuna.db").touch()
    assert study_storage(True, str(now), "val/loss", "min") == f"sqlite:///{first}/optuna.db"
    for monitor, mode in (("val/acc", "max"), ("val/bal_acc", "min")):  # another direction; the same direction
        with pytest.raises(ConfigError, match="optimizes monitor=val/loss") as refused:
            study_storage(True, str(now), monitor, mode)
        assert f"this search has monitor={monitor} (monitor_mode={mode})" in str(refused.value)
        assert "Fix: resume with monitor=val/loss monitor_mode=min" in str(refused.value)


def job_end_config(sweep: Path, *, fail_fast: bool, sweeper: str) -> DictConfig:
    """The parts of a job's config that SweepSummary reads."""
    return OmegaConf.create(
        {
            "sweep": {"fail_fast": fail_fast},
            "hydra": {
                "mode": RunMode.MULTIRUN,
                "sweep": {"dir": str(sweep)},
                "sweeper": {"_target_": sweeper},
                "job": {"num": 0},
                "runtime": {"output_dir": str(sweep / "0")},
            },
        }
    )


BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
OPTUNA = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"


@pytest.mark.parametrize(
    ("fail_fast", "sweeper", "stops"), [(True, BASIC, True), (False, BASIC, False), (True, OPTUNA, False)]
)
def test_a_failed_job_stops_the_basic_sweeper_only_under_fail_fast(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fail_fast: bool, sweeper: str, stops: bool
) -> None:
    make_job(tmp_path, 0, ["model.lr=-1"], {"status": "failed", "error": "ConfigError: lr: got -1"})
    failed = JobReturn(status=JobStatus.FAILED, _return_value=ValueError("lr"))
    config = job_end_config(tmp_path, fail_fast=fail_fast, sweeper=sweeper)
    if stops:
        with pytest.raises(SystemExit, match="1"):
            SweepSummary().on_job_end(config, failed)
        assert "job 0 failed and sweep.fail_fast=true stopped the sweep: ConfigError: lr: got -1" in (
            capsys.readouterr().err
        )
    else:
        SweepSummary().on_job_end(config, failed)  # Optuna records the failed trial and stops by itself
    assert [r["status"] for r in rows(tmp_path)] == ["failed"]  # written either way, before stopping


@pytest.fixture
def train_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Compose conf/train.yaml as train.py does, with every output path under tmp_path."""
    monkeypatch.setenv("RETRAIN_ROOT", str(tmp_path))
    register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        yield lambda *overrides: compose("train", overrides=list(overrides), return_hydra_config=True)


def test_optuna_search_optimizes_the_monitor_over_the_fine_tuning_knobs(train_config: Any, tmp_path: Path) -> None:
    cfg = train_config("hparams_search=optuna", "monitor=val/loss", "monitor_mode=min")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode == RunMode.MULTIRUN
    assert sweeper.direction == "minimize" and sweeper.study_name == "resnet18"
    assert set(sweeper.params) == {"model.lr", "model.weight_decay", "model.freeze", "data.augment", "data.batch_size"}
    sweep_dir = Path(cfg.hydra.sweep.dir)
    assert sweep_dir.parent == tmp_path / "logs" / "train" / "multiruns" / "resnet18"
    assert sweeper.storage == f"sqlite:///{sweep_dir}/optuna.db"
    assert train_config("hparams_search=optuna").hydra.sweeper.direction == "maximize"


def test_slurm_launcher_submits_the_partition_gpus_time_and_memory(
    train_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = train_config(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=600",
        "hydra.launcher.mem_gb=128",
        "trainer=gpu",
        "trainer.devices=4",
        "trainer.num_nodes=2",
    )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    submitted: list[submitit.AutoExecutor] = []

    def capture(executor: submitit.AutoExecutor, *args: Any) -> list[Any]:
        submitted.append(executor)
        return []  # no sbatch here: stop before anything is submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # as if srun were installed
    launcher.launch([["model.lr=0.01"], ["model.lr=0.001"]], initial_job_idx=0)
    (executor,) = submitted
    sbatch = executor._executor._make_submission_file_text("python train.py", "uid")
    for flag in ("--partition=gpu", "--gpus-per-node=4", "--ntasks-per-node=4", "--nodes=2", "--time=600"):
        assert f"#SBATCH {flag}\n" in sbatch
    assert "#SBATCH --mem=128GB\n" in sbatch
    assert str(executor.folder).startswith(str(Path(cfg.hydra.sweep.dir) / ".submitit"))


def test_resuming_a_study_that_does_not_exist_is_one_paragraph_before_the_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    register_resolvers()
    sweep = tmp_path / "multiruns" / "resnet18" / "2026-01-01_1"
    config = OmegaConf.create({"hydra": {"sweeper": {"storage": f"${{study_storage:true,{sweep},val/acc,max}}"}}})
    with pytest.raises(SystemExit, match="1"):
        SweepSummary().on_multirun_start(config)
    error = capsys.readouterr().err
    assert error.startswith("\nerror: hparams_search.resume=true found no optuna.db") and "Traceback" not in error


def test_a_sweep_publishes_only_its_best_job_at_its_end(tmp_path: Path) -> None:
    models = tmp_path / "models"
    meta = {"name": "cats", "version": 0, "class_names": ["cat", "dog"], "metrics": {}}
    weights = {}
    for num, value in enumerate((0.5, 0.75, 0.25)):  # job 1 is the best, job 2 ran last
        results = ok(value)
        job = make_job(tmp_path, num, [f"model.lr=0.{num + 1}"], {**results, "test": {}})
        weights[num] = torch.full((2, 3), float(num))
        model = torch.nn.Linear(3, 2)
        model.weight.data = weights[num]
        keep_for_sweep(job, model, meta, None, {**results, "test": {}}, model_dir=models, name="cats")
    config = OmegaConf.merge(job_end_config(tmp_path, fail_fast=False, sweeper=BASIC), {"sweep": {"publish": "best"}})
    SweepSummary().on_multirun_end(config)

    assert [p.name for p in (models / "cats").iterdir() if p.name.startswith("v")] == ["v001"]
    assert torch.equal(load_source("cats@latest", model_dir=models).state_dict["weight"], weights[1])
    assert json.loads((tmp_path / "1" / "results.json").read_text())["registry"]["version"] == 1
    assert not any(has_kept(tmp_path / str(num)) for num in range(3))  # the losers' kept models are dropped


def test_a_maximized_loss_stops_the_sweep_before_any_job(capsys: pytest.CaptureFixture[str]) -> None:
    config = OmegaConf.create(
        {"monitor": "val/loss", "monitor_mode": "max", "sweep": {"publish": "best"}, "hydra": {"sweeper": {}}}
    )
    with pytest.raises(SystemExit, match="1"):
        SweepSummary().on_multirun_start(config)
    error = capsys.readouterr().err
    assert "monitor=val/loss with monitor_mode=max: a loss is better when lower" in error
    assert "Fix: monitor_mode=min." in error


def test_a_search_of_no_trial_stops_before_optuna(capsys: pytest.CaptureFixture[str]) -> None:
    config = OmegaConf.create({"hydra": {"sweeper": {"_target_": OPTUNA, "n_trials": 0}}})
    with pytest.raises(SystemExit, match="1"):
        SweepSummary().on_multirun_start(config)
    assert "hparams_search.n_trials=0 runs no trial" in capsys.readouterr().err


def test_a_sweep_in_which_every_job_failed_exits_1_with_the_first_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for num in range(2):
        job = make_job(tmp_path, num, [f"model.lr=0.{num + 1}"], {"status": "failed", "error": "DataError: no root"})
        (job / "train.log").touch()
    with pytest.raises(SystemExit, match="1"):
        SweepSummary().on_multirun_end(job_end_config(tmp_path, fail_fast=False, sweeper=BASIC))
    error = capsys.readouterr().err
    assert "no job of the sweep succeeded (2 jobs" in error
    assert f"job 0: DataError: no root (its log: {tmp_path / '0' / 'train.log'}" in error


def test_an_optuna_search_whose_every_trial_failed_exits_1_after_its_last_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = job_end_config(tmp_path, fail_fast=False, sweeper=OPTUNA)
    config.hydra.sweeper.n_trials = 2
    failed = JobReturn(status=JobStatus.COMPLETED, _return_value=None)  # run_task's failed trial
    make_job(tmp_path, 0, ["model.lr=0.1"], {"status": "failed", "error": "DataError: no root"})
    SweepSummary().on_job_end(config, failed)  # one trial to go
    make_job(tmp_path, 1, ["model.lr=0.2"], {"status": "failed", "error": "DataError: no root"})
    with pytest.raises(SystemExit, match="1"):  # before Optuna asks for a best trial that does not exist
        SweepSummary().on_job_end(config, failed)
    assert "no job of the sweep succeeded (2 jobs" in capsys.readouterr().err


def test_a_resumed_search_does_not_publish_a_job_worse_than_the_studys_best(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with warnings.catch_warnings():  # optuna 2.10 warns about SQLAlchemy 2.0, which the `sweep` extra rules out
        warnings.simplefilter("ignore")
        import optuna
    runs, models = tmp_path / "multiruns" / "cats", tmp_path / "models"
    earlier, sweep = runs / "2026-01-01_1", runs / "2026-01-02_1"
    storage = f"sqlite:///{earlier / 'optuna.db'}"
    earlier.mkdir(parents=True)
    study = optuna.create_study(study_name="cats", storage=storage, direction="maximize")
    for value in (0.9, 0.5):  # the earlier sweep's trial (published as cats@v001), then this sweep's
        study.tell(study.ask(), value)
    registry = {"name": "cats", "version": 1, "path": str(models / "cats" / "v001")}
    make_job(earlier, 0, ["model.lr=0.1"], {**ok(0.9), "registry": registry})
    meta = {"name": "cats", "version": 0, "class_names": ["cat", "dog"], "metrics": {}}
    job = make_job(sweep, 0, ["model.lr=0.01"], {**ok(0.5), "test": {}})
    keep_for_sweep(job, torch.nn.Linear(3, 2), meta, None, {**ok(0.5), "test": {}}, model_dir=models, name="cats")
    config = OmegaConf.merge(
        job_end_config(sweep, fail_fast=False, sweeper=OPTUNA),
        {
            "sweep": {"publish": "best"},
            "hparams_search": {"resume": True},
            "hydra": {"sweeper": {"study_name": "cats", "storage": storage}},
        },
    )
    SweepSummary().on_multirun_end(config)
    assert not (models / "cats").exists() and not has_kept(job)
    assert "worse than the study's best trial (val/acc=0.9000" in caplog.text
    assert f"The study's best is cats@v001 ({registry['path']})" in caplog.text


def test_an_unknown_sweep_publish_mode_stops_the_sweep_before_any_job(capsys: pytest.CaptureFixture[str]) -> None:
    config = OmegaConf.create({"sweep": {"publish": "winner"}, "hydra": {"sweeper": {"_target_": BASIC}}})
    with pytest.raises(SystemExit, match="1"):
        SweepSummary().on_multirun_start(config)
    error = capsys.readouterr().err
    assert "sweep.publish=winner is not a publish mode" in error and "Fix: sweep.publish=best" in error

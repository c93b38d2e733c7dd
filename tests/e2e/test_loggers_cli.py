"""One training run as a user sees it: the three loggers read back, the report, the console and the run log."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import yaml
from clitools import FAST, assert_ok, run_cli
from omegaconf import OmegaConf
from rich.console import Console

from retrain.cli.main import main as retrain_cli
from retrain.utils.console import filter_known_warnings, summary_panel

pytestmark = pytest.mark.e2e
# FAST minus the switches this file checks: the progress bar and the config tree stay on, as for a user.
SHOWN = tuple(o for o in FAST if not o.startswith(("trainer.enable_progress_bar", "extras.print_config")))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, imagefolder: Path):
    """A 2-epoch run with csv, tensorboard and mlflow at once; warnings shown as Python shows them by default."""
    cwd = tmp_path_factory.mktemp("loggers")
    result = run_cli(
        "train.py",
        f"data.root={imagefolder}",
        "trainer.max_epochs=2",
        "logger=[csv,tensorboard,mlflow]",
        *SHOWN,
        cwd=cwd,
        env={"PYTHONWARNINGS": "default"},
    )
    assert_ok(result)
    result.first = result.results()
    return result


def test_csv_logger_wrote_per_epoch_metrics_and_the_hyperparameters(run) -> None:
    run_dir = Path(run.first["run_dir"])
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({int(r["epoch"]) for r in rows if r.get("val/acc")}) == [0, 1]
    assert any(r.get("test/acc") for r in rows)
    hparams = yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())
    assert hparams["model"]["arch"] == "resnet18" and hparams["trainer"]["max_epochs"] == 2
    assert hparams["artifact"]["name"] == "resnet18" and hparams["artifact"]["version"] == 1
    assert hparams["artifact"]["class_names"] == "cat,dog,fox"


def test_tensorboard_event_file_reads_back(run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = Path(run.first["run_dir"]) / "tensorboard"
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("val/acc")] == pytest.approx([r["val/acc"] for r in run.first["history"]])
    assert {"train/loss_epoch", "test/acc"} <= set(events.Tags()["scalars"])
    assert {"report/curves", "report/confusion_matrix", "report/top_losses"} <= set(events.Tags()["images"])
    assert yaml.safe_load((log_dir / "hparams.yaml").read_text())["artifact"]["arch"] == "resnet18"


def test_mlflow_run_reads_back_from_the_sqlite_store(run, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run.cwd / 'logs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("resnet18")
    assert experiment is not None
    (found,) = client.search_runs([experiment.experiment_id])
    run_id = found.info.run_id
    assert found.info.status == "FINISHED"
    assert found.data.tags["run_dir"] == run.first["run_dir"]
    assert len(client.get_metric_history(run_id, "val/acc")) == 2
    assert found.data.metrics["test/acc"] == pytest.approx(run.first["test"]["test/acc"])
    assert found.data.params["model/arch"] == "resnet18"
    assert found.data.params["artifact/class_names"] == "cat,dog,fox"
    assert {a.path for a in client.list_artifacts(run_id, "report")} >= {"report/report.md", "report/curves.png"}
    metadata = json.loads(Path(client.download_artifacts(run_id, "metadata.json", str(tmp_path))).read_text())
    assert metadata["class_names"] == ["cat", "dog", "fox"] and metadata["version"] == 1


def test_report_is_in_the_run_dir_and_in_the_registry_version(run) -> None:
    report = Path(run.first["report"])
    assert report == Path(run.first["run_dir"]) / "report"
    published = Path(run.first["registry"]["path"]) / "report"
    for name in ("report.md", "curves.png", "confusion_matrix.png", "per_class.csv", "top_losses.png"):
        assert (report / name).read_bytes() == (published / name).read_bytes(), name
    text = (report / "report.md").read_text()
    assert "test/acc" in text and "trainer.max_epochs=2" in text and "| **total** | 24 | 12 | 12 |" in text


def test_report_rebuilds_from_the_run_dir_and_from_the_registry(run, tmp_path: Path, capsys) -> None:
    run_dir = run.first["run_dir"]
    assert retrain_cli(["report", run_dir, "--out", str(tmp_path / "from_run")]) == 0
    models = str(run.cwd / "models")
    assert (
        retrain_cli(["report", "resnet18@v001", "--model-dir", models, "--out", str(tmp_path / "from_registry")]) == 0
    )
    original = (Path(run_dir) / "report" / "per_class.csv").read_text()
    assert (tmp_path / "from_run" / "per_class.csv").read_text() == original
    assert (tmp_path / "from_registry" / "per_class.csv").read_text() == original
    assert "trainer.max_epochs=2" in (tmp_path / "from_registry" / "report.md").read_text()  # found its run
    assert retrain_cli(["report", "nosuchmodel@v9", "--model-dir", models]) == 1
    assert "No model named 'nosuchmodel'" in capsys.readouterr().err


def test_console_shows_the_config_tree_one_line_per_epoch_and_one_summary_panel(run) -> None:
    out = run.stdout
    # stdout is a pipe here, as under SLURM or CI: no Rich bar, one plain line per epoch, the last before the report
    assert out.index("├── data") < out.index("epoch 0/1  train/loss") < out.index("epoch 1/1  train/loss")
    assert out.index("epoch 1/1  train/loss") < out.index("report written") < out.index("resnet18 trained")
    assert "━" not in out and "Epoch 0/1" not in out
    assert out.count("resnet18 trained") == 1
    for line in ("best val/acc", "best checkpoint", "models/resnet18/v001", "report.md", "results.json"):
        assert line in out
    assert "python eval.py ckpt_path=resnet18@v001 data.root=" in out
    assert "python predict.py ckpt_path=resnet18@v001 input=" in out and "/test" in out
    assert "python export.py ckpt_path=resnet18@v001 'formats=[onnx]'" in out


def test_known_noise_is_filtered_by_message_and_other_warnings_still_show(run) -> None:
    for noise in ("LeafSpec", "litlogger", "litmodels", "Creating initial MLflow database", "not found. Creating it"):
        assert noise not in run.output, noise
    # 3 train batches < log_every_n_steps=10: a warning a user can act on, so it must still be shown.
    assert "smaller than the logging interval" in run.output


def test_run_log_holds_our_lines_lightnings_and_the_warnings_once_each(run) -> None:
    text = (Path(run.first["run_dir"]) / "train.log").read_text()
    assert text.count("`Trainer.fit` stopped") == 1
    assert "finished: best val/acc=" in text and "report written to" in text
    assert text.count("  val/acc ") == 2 and text.index("epoch 1/1  train/loss") < text.index("report written to")
    assert "smaller than the logging interval" in text


def test_warning_filter_matches_known_messages_only() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_known_warnings()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("The 'train_dataloader' does not have many workers which may be a bottleneck.", stacklevel=1)
        warnings.warn("Found 20 module(s) in eval mode at the start of training.", stacklevel=1)
        warnings.warn("The 'train_dataloader' has a bad label", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["The 'train_dataloader' has a bad label"]


def test_summary_panel_of_an_unpublished_run_points_at_its_checkpoint(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    results = {
        "name": "flowers",
        "run_dir": str(tmp_path / "logs" / "run"),
        "monitor": "val/acc",
        "monitor_value": 0.875,
        "best_epoch": 3,
        "best_checkpoint": str(tmp_path / "logs" / "run" / "checkpoints" / "best [1].ckpt"),
        "test": {"test/acc": 0.8125, "test/loss": 0.4},
    }
    cfg = OmegaConf.create({"task_name": "train", "data": {"root": "/data/flowers"}, "paths": {"model_dir": "models"}})
    console = Console(record=True, width=200)
    console.print(summary_panel(results, cfg))
    text = console.export_text()
    assert "0.8750 (epoch 3)" in text and "test/acc 0.8125" in text and "registry" not in text
    assert "python eval.py 'ckpt_path=logs/run/checkpoints/best [1].ckpt' data.root=/data/flowers" in text
    assert "'formats=[onnx]'" in text  # brackets are printed, not read as Rich markup

"""The foundation, as a user runs it: train, resume, sweep, DDP and eval through the real CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from clitools import FAST, assert_ok, make_imagefolder, run_cli

pytestmark = pytest.mark.e2e
LIMITS = ("trainer.limit_train_batches=2", "trainer.limit_val_batches=2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, imagefolder: Path):
    """One 2-epoch run on the split layout, shared by the checks below."""
    cwd = tmp_path_factory.mktemp("work")
    result = run_cli("train.py", f"data.root={imagefolder}", "trainer.max_epochs=2", *FAST, cwd=cwd)
    assert_ok(result)
    result.first = result.results()  # later tests add runs in the same folder
    return result


def test_run_leaves_results_checkpoints_metrics_and_a_registry_version(trained) -> None:
    results = trained.first
    run_dir = Path(results["run_dir"])
    assert results["status"] == "ok"
    assert results["class_names"] == ["cat", "dog", "fox"]
    assert [row["epoch"] for row in results["history"]] == [0, 1]
    assert 0.0 <= results["monitor_value"] <= 1.0 and results["monitor"] == "val/acc"
    assert set(results["test"]) >= {"test/acc", "test/f1", "test/loss"}
    assert Path(results["config_path"]).is_file()
    assert yaml.safe_load(Path(results["config_path"]).read_text())["data"]["root"].endswith("images")
    best = Path(results["best_checkpoint"])
    assert best.is_file() and best.name.startswith("resnet18-v001-") and "-val_acc" in best.name
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    with open(run_dir / "csv" / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    assert {"train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/f1", "test/acc"} <= columns
    version = Path(results["registry"]["path"])
    assert version == trained.cwd / "models" / "resnet18" / "v001"
    # Weights and metadata, not the optimizer: the run folder keeps the full checkpoint for resuming.
    assert {"weights.pth", "model.safetensors", "metadata.json", "results.json"} <= {p.name for p in version.iterdir()}
    assert not (version / "model.ckpt").exists()
    assert "best checkpoint" in trained.output and "results.json" in trained.output


def test_eval_reproduces_the_test_accuracy_training_reported(trained, imagefolder: Path) -> None:
    results = trained.first
    evaluated = run_cli(
        "eval.py", f"ckpt_path={results['best_checkpoint']}", f"data.root={imagefolder}", cwd=trained.cwd
    )
    assert_ok(evaluated)
    scores = evaluated.results("eval")
    assert scores["split"] == "test"
    assert scores["test"]["test/acc"] == pytest.approx(results["test"]["test/acc"], abs=1e-6)
    assert scores["class_names"] == results["class_names"]


def test_resume_continues_epochs_optimizer_and_schedule(trained, imagefolder: Path) -> None:
    first = trained.first
    ckpt = torch.load(Path(first["run_dir"]) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    resumed = run_cli(
        "train.py",
        f"data.root={imagefolder}",
        "trainer.max_epochs=3",
        "ckpt_path=last",
        *FAST,
        cwd=trained.cwd,
    )
    assert_ok(resumed)
    results = resumed.results()
    assert [row["epoch"] for row in results["history"]] == [
        0,
        1,
        2,
    ]  # epochs 0-1 restored, only 2 was trained
    assert results["global_step"] == first["global_step"] * 3 // 2
    assert results["metadata"]["parent"]["how"] == "resumed"
    assert results["metadata"]["parent"]["path"].endswith("last.ckpt")
    # The cosine schedule continued where it stopped (T_max=3 now, epoch 2), not from the start.
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 2


def test_flat_layout_is_split_by_fraction_and_recorded(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "flat", layout="folder", per_class=10)  # 20 images per class
    result = run_cli(
        "train.py",
        f"data.root={root}",
        "data.val_fraction=0.2",
        "data.test_fraction=0.1",
        "trainer.max_epochs=1",
        "model.freeze=[stem,layer1]",
        "model/optimizer=adamw",
        "model/scheduler=step",
        "save.publish=false",
        *FAST,
        *LIMITS,
        cwd=tmp_path,
    )
    assert_ok(result)
    results = result.results()
    split = json.loads((Path(results["run_dir"]) / "split.json").read_text())
    assert {k: len(v) for k, v in split["samples"].items()} == {"train": 42, "val": 12, "test": 6}
    train_files = {p for p, _ in split["samples"]["train"]}
    assert not train_files & {p for p, _ in split["samples"]["val"]}
    assert results["metadata"]["freeze"] == ["stem", "layer1"]
    assert "registry" not in results


def test_sweep_runs_one_numbered_job_per_value(tmp_path: Path, imagefolder: Path) -> None:
    result = run_cli(
        "train.py",
        "-m",
        "model.lr=0.01,0.001",
        f"data.root={imagefolder}",
        "trainer.max_epochs=1",
        *FAST,
        *LIMITS,
        cwd=tmp_path,
    )
    assert_ok(result)
    sweeps = list((tmp_path / "logs" / "train" / "multiruns" / "resnet18").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    lrs = [yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["model"]["lr"] for job in jobs]
    assert lrs == [0.01, 0.001]
    for job in jobs:
        assert json.loads((job / "results.json").read_text())["status"] == "ok"
    # sweep.publish=best: one version, the best job's, published when the sweep ends (not one per job).
    versions = sorted(p.name for p in (tmp_path / "models" / "resnet18").glob("v*"))
    assert versions == ["v001"]
    with open(sweeps[0] / "sweep_summary.csv", newline="") as f:
        best = next(row["job"] for row in csv.DictReader(f) if row["best"] == "true")
    published = json.loads((tmp_path / "models" / "resnet18" / "v001" / "results.json").read_text())
    assert published["run_dir"] == str(sweeps[0] / best)


def test_ddp_on_cpu_gives_one_run_one_set_of_checkpoints(tmp_path: Path, imagefolder: Path) -> None:
    result = run_cli(
        "train.py",
        "trainer.devices=2",  # exactly what the user types; on a CPU this is DDP over gloo
        "model.freeze=true",
        f"data.root={imagefolder}",
        "trainer.max_epochs=1",
        *FAST,
        cwd=tmp_path,
    )
    assert_ok(result)
    runs = result.runs()
    assert len(runs) == 1
    assert len(list(runs[0].glob("**/results.json"))) == 1
    results = result.results()
    assert results["status"] == "ok"
    assert len(list((runs[0] / "checkpoints").glob("resnet18-v001-*.ckpt"))) == 1
    assert sorted(p.name for p in (tmp_path / "models" / "resnet18").glob("v*")) == ["v001"]


def test_demo_experiment_builds_its_data_offline_and_trains(tmp_path: Path) -> None:
    result = run_cli(
        "train.py",
        "experiment=demo",
        "trainer.max_epochs=1",
        "data.num_workers=0",
        "data.image_size=32",
        *LIMITS,
        "trainer.enable_progress_bar=false",
        cwd=tmp_path,
    )
    assert_ok(result)
    demo = tmp_path / "data" / "demo"
    assert len(list((demo / "train").iterdir())) >= 4
    assert list(demo.glob("train/*/*.jpg")) and list(demo.glob("train/*/*.png"))
    assert result.results()["name"] == "demo"


def test_user_mistake_is_one_paragraph_and_full_trace_on_request(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = run_cli("train.py", f"data.root={missing}", *FAST, cwd=tmp_path)
    assert result.returncode != 0
    assert f"data.root={missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr and "Fix:" in result.stderr
    full = run_cli("train.py", f"data.root={missing}", *FAST, cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr

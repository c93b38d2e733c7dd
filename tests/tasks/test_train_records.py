"""A run's records agree with each other: results.json, metrics.csv, TensorBoard, report/history.json, the best
checkpoint's name and the end panel give the same numbers for every epoch. And resuming says what it does: a
finished, published run is not published again; more epochs under cosine warn that the learning rate rises."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import re
from pathlib import Path

import pytest
from clitools import FAST, composed, make_imagefolder

from retrain.model.module import logged_metric_names
from retrain.tasks.train import train

EPOCHS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 3-epoch run logging to CSV and TensorBoard, with what it printed."""
    tmp = tmp_path_factory.mktemp("records")
    root = make_imagefolder(tmp / "images", per_class=8)
    out = io.StringIO()  # the end panel, printed to stdout
    cfg = composed(tmp, f"data.root={root}", *FAST, f"trainer.max_epochs={EPOCHS}", "logger=[csv,tensorboard]")
    with contextlib.redirect_stdout(out):
        results = train(cfg)
    run_dir = Path(results["run_dir"])
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {
        "tmp": tmp,
        "root": root,
        "results": results,
        "saved": json.loads((run_dir / "results.json").read_text()),
        "csv": rows,
        "report": json.loads((run_dir / "report" / "history.json").read_text())["history"],
        "printed": out.getvalue(),
    }


def csv_epoch(rows: list[dict], epoch: int, key: str) -> float:
    """The one value metrics.csv holds for `key` at `epoch`."""
    (value,) = [float(r[key]) for r in rows if r.get(key) and r.get("epoch") and int(r["epoch"]) == epoch]
    return value


def test_every_epoch_agrees_across_results_metrics_csv_and_the_report(run) -> None:
    history = run["saved"]["history"]
    assert [row["epoch"] for row in history] == list(range(EPOCHS))
    assert history == run["results"]["history"] == run["report"]
    for row in history:
        epoch = row["epoch"]
        # train/loss is the epoch's mean (metrics.csv: train/loss_epoch), not the last step's.
        assert row["train/loss"] == pytest.approx(csv_epoch(run["csv"], epoch, "train/loss_epoch"), abs=1e-6)
        for key in ("train/acc", "train/f1", "val/acc", "val/loss", "val/f1"):
            assert row[key] == pytest.approx(csv_epoch(run["csv"], epoch, key), abs=1e-6), (epoch, key)
        assert set(row) == {"epoch", *logged_metric_names(3)}  # plain names: no _step or _epoch twins
    assert run["saved"]["final"] == {k: v for k, v in history[-1].items() if k != "epoch"}


def test_the_best_epoch_is_one_epoch_everywhere(run) -> None:
    saved = run["saved"]
    best_epoch = saved["best_epoch"]
    assert saved["best"] == saved["history"][best_epoch]
    assert saved["monitor_value"] == saved["best"]["val/acc"]
    file_epoch = int(re.search(r"-epoch(\d{3})-", Path(saved["best_checkpoint"]).name).group(1))
    assert file_epoch == best_epoch
    assert f"(epoch {best_epoch})" in run["printed"] and Path(saved["best_checkpoint"]).name in run["printed"]
    report = (Path(saved["run_dir"]) / "report" / "report.md").read_text()
    assert f"best epoch ({best_epoch})" in report or f"best and last epoch ({best_epoch})" in report


def test_the_post_fit_test_is_logged_at_the_last_epoch_and_step(run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    last_val = [r for r in run["csv"] if r.get("val/acc") and int(r["epoch"]) == EPOCHS - 1]
    (test_row,) = [r for r in run["csv"] if r.get("test/acc")]
    assert (int(test_row["epoch"]), int(test_row["step"])) == (EPOCHS - 1, int(last_val[0]["step"]))
    assert int(test_row["step"]) == run["saved"]["global_step"] - 1
    events = EventAccumulator(str(Path(run["saved"]["run_dir"]) / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("test/acc")] == [int(test_row["step"])]
    assert [e.step for e in events.Scalars("val/acc")][-1] == int(test_row["step"])


def test_resuming_a_finished_published_run_does_nothing_and_says_so(
    run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    last = Path(run["saved"]["run_dir"]) / "checkpoints" / "last.ckpt"
    models = run["tmp"] / "models"
    cfg = composed(
        tmp_path,
        f"data.root={run['root']}",
        *FAST,
        f"trainer.max_epochs={EPOCHS}",
        f"ckpt_path={last}",
        f"paths.model_dir={models}",
    )
    with caplog.at_level(logging.WARNING, logger="retrain"):
        results = train(cfg)
    assert results["status"] == "nothing_to_do" and results["registry"]["version"] == "v001"
    assert sorted(p.name for p in (models / "resnet18").glob("v[0-9]*")) == ["v001"]
    assert f"Nothing to do: {last} is a finished run ({EPOCHS} epochs" in caplog.text
    assert "already published as resnet18@v001" in caplog.text
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "nothing_to_do"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_more_epochs_under_cosine_warn_that_the_lr_rises_again(
    run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    last = Path(run["saved"]["run_dir"]) / "checkpoints" / "last.ckpt"
    cfg = composed(
        tmp_path,
        f"data.root={run['root']}",
        *FAST,
        f"trainer.max_epochs={EPOCHS + 1}",
        f"ckpt_path={last}",
        f"paths.model_dir={tmp_path / 'models'}",
        "~callbacks.report",
    )
    with caplog.at_level(logging.WARNING, logger="retrain"):
        results = train(cfg)
    assert f"Resuming with trainer.max_epochs={EPOCHS + 1}, but the cosine schedule" in caplog.text
    assert f"(T_max={EPOCHS}): after epoch {EPOCHS} the learning rate rises again" in caplog.text
    assert f"resume with trainer.max_epochs={EPOCHS}" in caplog.text and "model.init_from=" in caplog.text
    # The resumed run's history continues the first one's, row for row.
    assert results["history"][:EPOCHS] == run["saved"]["history"]
    assert [row["epoch"] for row in results["history"]] == list(range(EPOCHS + 1))
    # Its best checkpoint is the one epoch this run saved (Lightning starts a new top-k in a new folder), and
    # results.json names that epoch, not an earlier one with the same score.
    assert f"-epoch{EPOCHS:03d}-" in Path(results["best_checkpoint"]).name
    assert results["best_epoch"] == EPOCHS and results["best"] == results["history"][EPOCHS]


def test_a_finished_run_not_published_in_this_registry_is_tested_and_published(run, tmp_path: Path) -> None:
    # What a rerun after a SIGTERM in the post-fit test does: no training left, straight to test and publish.
    last = Path(run["saved"]["run_dir"]) / "checkpoints" / "last.ckpt"
    cfg = composed(
        tmp_path,
        f"data.root={run['root']}",
        *FAST,
        f"trainer.max_epochs={EPOCHS}",
        f"ckpt_path={last}",
        f"paths.model_dir={tmp_path / 'models'}",
        "~callbacks.report",
    )
    results = train(cfg)
    assert results["status"] == "ok" and Path(results["registry"]["path"]) == tmp_path / "models" / "resnet18" / "v001"
    assert results["global_step"] == run["saved"]["global_step"]  # no training step was added
    assert results["test"]["test/acc"] == pytest.approx(run["saved"]["test"]["test/acc"])


def test_after_a_resume_the_best_epoch_is_the_published_checkpoints_own(tmp_path: Path) -> None:
    # model.lr=1e-12, too small to change a float32 weight: every epoch scores the same. A resume into a new run
    # folder starts a new top-k there, so its best checkpoint is its own epoch; results.json and the panel used
    # to name the first epoch of equal score.
    root = make_imagefolder(tmp_path / "images", per_class=4)
    common = (f"data.root={root}", *FAST, "model.freeze=true", "model.lr=1e-12", "~callbacks.report")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = train(composed(tmp_path / "a", *common, "trainer.max_epochs=2"))
    assert len({row["val/acc"] for row in first["history"]}) == 1  # a tie in every epoch
    last = Path(first["run_dir"]) / "checkpoints" / "last.ckpt"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        resumed = train(composed(tmp_path / "b", *common, "trainer.max_epochs=3", f"ckpt_path={last}"))
    assert "-epoch002-" in Path(resumed["best_checkpoint"]).name
    assert resumed["best_epoch"] == 2 and resumed["best"] == resumed["history"][2]
    assert "(epoch 2)" in out.getvalue()


def test_a_smoke_test_publishes_nothing_saves_nothing_and_says_so(run, tmp_path: Path) -> None:
    # debug=fast used to publish its one-batch model as the name's latest version (what predict, serve and eval load
    # by default) and to leave a last.ckpt that ckpt_path=last then resumed instead of the real run.
    out = io.StringIO()
    cfg = composed(tmp_path, f"data.root={run['root']}", *FAST, "debug=fast")
    with contextlib.redirect_stdout(out):
        results = train(cfg)
    assert results["status"] == "ok" and "registry" not in results
    assert not (tmp_path / "models").exists() and not list(Path(results["run_dir"]).rglob("*.ckpt"))
    assert "no model: no checkpoint, nothing published" in out.getvalue() and "ckpt_path=?" not in out.getvalue()

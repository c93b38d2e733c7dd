"""A model that did not learn is never published: settings that cannot train stop before a version is reserved,
too few images for a batch still train, a diverging loss stops the run, weights with NaN are refused, and
Ctrl-C stops like SIGTERM. Each runs the train task in-process, on 32 px images."""

from __future__ import annotations

import json
import logging
import re
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torchvision
from clitools import FAST, composed, make_imagefolder

import retrain.tasks.train as train_task
from retrain.artifacts.formats import Artifact
from retrain.callbacks.preemption import INTERRUPTED_EXIT_CODE
from retrain.errors import ArtifactError, ConfigError, TrainingError
from retrain.tasks.guards import check_schedule_on_resume
from retrain.tasks.train import train
from retrain.utils.hydra import run_task


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 8 train images each (24: three batches of 8)."""
    return make_imagefolder(tmp_path_factory.mktemp("guards") / "images", per_class=8)


def published(tmp_path: Path) -> list[str]:
    """The version folders of resnet18 in the test's registry."""
    return sorted(p.name for p in (tmp_path / "models" / "resnet18").glob("v[0-9]*"))


def nothing_reserved_or_published(tmp_path: Path) -> bool:
    """No registry folder at all: the run stopped before reserving a version."""
    return not (tmp_path / "models").exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("data.batch_size=0", r"data.batch_size=0; expected 1 or more.*Fix: e.g. data.batch_size=32"),
        ("data.batch_size=-8", r"data.batch_size=-8; expected 1 or more"),
        ("trainer.max_epochs=0", r"trainer.max_epochs=0 trains nothing.*Fix: trainer.max_epochs=10.*eval.py"),
        ("monitor=val/accc", r"monitor=val/accc is never logged.*Expected one of \['train/loss'"),
        ("monitor=val/acc_top5", r"top-5 accuracy is logged only with 5 or more classes.*has 3 \(cat, dog, fox\)"),
        ("callbacks.checkpoint.monitor=val/accc", r"callbacks.checkpoint.monitor=val/accc is never logged"),
        (
            "monitor=val/loss",
            r"monitor=val/loss with monitor_mode=max: a loss is better when lower.*Fix: monitor_mode=min",
        ),
        (
            "callbacks.checkpoint.monitor=train/loss",
            r"checkpoint.monitor=train/loss with callbacks.checkpoint.mode=max",
        ),
    ],
)
def test_settings_that_cannot_train_stop_before_a_version_is_reserved(
    tmp_path: Path, folder: Path, override: str, says: str
) -> None:
    with pytest.raises(ConfigError, match=says) as error:
        train(composed(tmp_path, f"data.root={folder}", *FAST, override))
    assert "Fix:" in str(error.value)
    assert nothing_reserved_or_published(tmp_path)


def test_a_monitor_typo_names_the_metric_meant(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(ConfigError, match=r"Fix: monitor=val/acc\.$"):
        train(composed(tmp_path, f"data.root={folder}", *FAST, "monitor=val/accc"))
    with pytest.raises(ConfigError, match=r"Fix: monitor=val/loss with monitor_mode=min\.$"):
        train(composed(tmp_path, f"data.root={folder}", *FAST, "monitor=val/los"))


def test_fewer_images_than_a_batch_still_train_and_publish(tmp_path: Path) -> None:
    few = make_imagefolder(tmp_path / "few", per_class=2)  # 6 train images, batches of 32
    cfg = composed(
        tmp_path, f"data.root={few}", *FAST, "data.batch_size=32", "trainer.max_epochs=2", "model.feature_cache=false"
    )
    results = train(cfg)
    assert results["global_step"] == 2  # one batch of 6 per epoch; drop_last used to drop it: 0 steps
    assert [row["epoch"] for row in results["history"]] == [0, 1]
    assert published(tmp_path) == ["v001"]


def test_a_diverging_loss_stops_the_run_failed_and_unpublished(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = composed(tmp_path, f"data.root={folder}", *FAST, "model.lr=1e9", "trainer.max_epochs=3")
    with pytest.raises(SystemExit) as stopped:
        run_task(train, cfg)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert re.search(
        r"error: train/loss is (nan|inf) at step [12] \(epoch 0, batch [12]\) with learning rate 1e\+09", err
    )
    assert "Fix: lower the learning rate (e.g. model.lr=1e+07)" in err and "Traceback" not in err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and "TrainingError" in results["error"]
    assert published(tmp_path) == []
    assert not (tmp_path / "models" / "resnet18" / "latest").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_holding_nan_or_inf_are_refused_by_name(tmp_path: Path, folder: Path, bad: float) -> None:
    state = torchvision.models.resnet18(num_classes=3).state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = bad
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ArtifactError, match=r"1 tensors hold NaN or inf: layer2.0.conv1.weight \(1 of 73728 values\)"):
        train(composed(tmp_path, f"data.root={folder}", f"model.init_from={tmp_path / 'broken.pth'}", *FAST))
    assert nothing_reserved_or_published(tmp_path)


class CtrlCAtSecondBatch(L.Callback):
    """Presses Ctrl-C (SIGINT to this process) while epoch 0's second batch trains."""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """SIGINT once, in batch 1 of epoch 0."""
        if trainer.current_epoch == 0 and batch_idx == 1:
            signal.raise_signal(signal.SIGINT)


def test_ctrl_c_saves_last_ckpt_says_how_to_resume_and_exits_130(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    make_callbacks = train_task.make_callbacks
    monkeypatch.setattr(train_task, "make_callbacks", lambda cfg: [*make_callbacks(cfg), CtrlCAtSecondBatch()])
    cfg = composed(tmp_path, f"data.root={folder}", *FAST, "trainer.max_epochs=2", "~callbacks.report")
    before = signal.getsignal(signal.SIGINT)
    with caplog.at_level(logging.WARNING, logger="retrain"), pytest.raises(SystemExit) as stopped:
        run_task(train, cfg)
    assert stopped.value.code == INTERRUPTED_EXIT_CODE == 130
    assert signal.getsignal(signal.SIGINT) is before  # pytest's own Ctrl-C works again
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2  # after the second batch
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "interrupted" and results["phase"] == "fit"
    assert results["resume_command"].endswith("name=resnet18 ckpt_path=last")
    assert "Stopped on Ctrl-C in fit at epoch 0, step 2" in caplog.text and results["resume_command"] in caplog.text
    assert published(tmp_path) == []
    assert not list((tmp_path / "models" / "resnet18").glob(".*.partial"))  # the reservation is dropped


def test_a_fit_without_a_training_step_publishes_nothing(tmp_path: Path, folder: Path) -> None:
    cfg = composed(tmp_path, f"data.root={folder}", *FAST, "trainer.limit_train_batches=0", "~callbacks.report")
    with pytest.raises(TrainingError, match=r"No training step ran: 24 training images in batches of 8 gave 0 batch"):
        train(cfg)
    assert published(tmp_path) == []


def test_resuming_one_cycle_with_more_epochs_is_refused_before_training(tmp_path: Path, folder: Path) -> None:
    # One-cycle's length is fixed at its start; PyTorch would raise only once the old last step is passed.
    checkpoint = {"lr_schedulers": [{"total_steps": 9, "last_epoch": 9}], "global_step": 9}
    resumed = Artifact({}, {"config": {"trainer": {"max_epochs": 3}}}, None, "lightning", None, checkpoint)
    cfg = composed(tmp_path, f"data.root={folder}", *FAST, "trainer.max_epochs=5")
    with pytest.raises(ConfigError, match=r"one-cycle schedule of old.ckpt was set for 3 epochs \(9 steps\)"):
        check_schedule_on_resume(cfg, resumed, Path("old.ckpt"))

"""Logs where no terminal reads them: one plain line per epoch, in the run log, with the values metrics.csv holds."""

from __future__ import annotations

import csv
import doctest
import io
import logging
import re
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from clitools import composed, make_imagefolder
from lightning.pytorch.callbacks import LambdaCallback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

import retrain.callbacks.epoch_log as epoch_log_module
from retrain.callbacks.epoch_log import EpochLog
from retrain.data.datamodule import ImageFolderDataModule
from retrain.data.splits import discover
from retrain.model.module import ClassifierModule
from retrain.model.resnet import build_resnet
from retrain.utils.console import log_to_run_log_only

EPOCH_LINE = re.compile(r"^epoch (\d+)/2  (.*)  lr (\S+)  [\d.]+s$", re.M)


class _Pipe(io.StringIO):
    """What stdout is under SLURM, CI or `| tee`: a stream that is not a terminal."""

    def isatty(self) -> bool:
        return False


@pytest.fixture
def run_log(tmp_path: Path) -> Iterator[tuple[Path, _Pipe]]:
    """The two handlers Hydra's job logging installs: the run's train.log and the console (here a pipe)."""
    root = logging.getLogger()
    log_file, pipe = tmp_path / "train.log", _Pipe()
    handlers = [logging.FileHandler(log_file), logging.StreamHandler(pipe)]
    old_level = root.level
    root.setLevel(logging.INFO)
    for handler in handlers:
        root.addHandler(handler)
    yield log_file, pipe
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(old_level)


def test_each_epoch_is_one_line_with_the_metrics_csv_values_before_fit_ends(tmp_path: Path, run_log) -> None:
    log_file, pipe = run_log
    splits = discover(make_imagefolder(tmp_path / "images", per_class=8))
    module = ClassifierModule(
        build_resnet("resnet18", 3),
        splits.class_names,
        optimizer=partial(torch.optim.SGD, momentum=0.9),
        scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        lr=0.01,
    )
    fit_end = LambdaCallback(on_fit_end=lambda *_: logging.getLogger("retrain").info("fit ended"))
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        callbacks=[EpochLog(progress_every_s=1e-9), LearningRateMonitor(logging_interval="epoch"), fit_end],
        logger=CSVLogger(tmp_path, name="csv", version=""),
        enable_progress_bar=False,  # as trainer.enable_progress_bar resolves when stdout is not a terminal
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=ImageFolderDataModule(splits, image_size=32, batch_size=8, num_workers=0))

    text = log_file.read_text()
    assert pipe.getvalue() == text  # no bar on screen: the same lines on stdout as in train.log
    lines = EPOCH_LINE.findall(text)
    assert [int(epoch) for epoch, _, _ in lines] == [0, 1, 2]  # exactly one line per epoch
    assert text.index("epoch 2/2") < text.index("fit ended")  # the last epoch before the end-of-run report
    # Progress lines inside a long epoch (here: after every batch, as progress_every_s is tiny).
    assert re.search(r"epoch 0  batch 2/3 \(67%\)  \d+s\n", text) and "epoch 2  val batch 1/2 (50%)" in text
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    lrs = [float(row["lr-SGD/fc"]) for row in rows if row["lr-SGD/fc"]]  # the LR monitor's row of each epoch
    for (epoch, metrics, lr), lr_logged in zip(lines, lrs, strict=True):
        shown = {k: float(v) for k, v in zip(*[iter(metrics.split())] * 2, strict=True)}
        keys = list(shown)
        assert keys[:2] == ["train/loss", "train/acc"] and keys.index("val/loss") + 1 == keys.index("val/acc")
        logged = {
            k.removesuffix("_epoch"): float(v)
            for row in rows
            if row["epoch"] == epoch
            for k, v in row.items()
            if v and k.removesuffix("_epoch") in shown and not k.endswith("_step")
        }
        assert shown == pytest.approx(logged, abs=5e-5)  # every metric of the epoch, at the value metrics.csv holds
        assert float(lr) == pytest.approx(lr_logged, rel=1e-2)
    assert [float(lr) for _, _, lr in lines] == pytest.approx([0.01, 0.005, 0.0025])


def test_with_a_bar_on_screen_the_line_goes_to_the_run_log_only(run_log) -> None:
    log_file, pipe = run_log
    log_to_run_log_only(logging.getLogger("retrain.callbacks.epoch_log"), "epoch 0/1  val/acc 0.5000  1.0s")
    assert "epoch 0/1  val/acc 0.5000" in log_file.read_text()
    assert pipe.getvalue() == ""


def test_the_rich_bar_only_when_stdout_is_a_terminal(tmp_path: Path, monkeypatch) -> None:
    pipe = _Pipe()
    monkeypatch.setattr(sys, "stdout", pipe)
    assert composed(tmp_path).trainer.enable_progress_bar is False
    monkeypatch.setattr(pipe, "isatty", lambda: True)
    assert composed(tmp_path).trainer.enable_progress_bar is True
    assert composed(tmp_path, "trainer.enable_progress_bar=false").trainer.enable_progress_bar is False


def test_docstring_example_runs() -> None:
    assert doctest.testmod(epoch_log_module, raise_on_error=True).attempted >= 1

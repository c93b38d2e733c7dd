"""The run report: per-class numbers against a hand computation, valid plots, and the callback inside a real fit."""

from __future__ import annotations

import csv
import doctest
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from clitools import make_imagefolder, write_image
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

import retrain.callbacks.run_report as report_module
from retrain.analysis.per_class import confident_errors
from retrain.analysis.plots import plot_confusion
from retrain.analysis.report_files import REPORT_FILES, Predictions, ReportInputs, write_report
from retrain.callbacks.run_report import RunReport, finish_report
from retrain.callbacks.unfreeze import ProgressiveUnfreeze
from retrain.cli.report_cmd import _unfreeze_milestones
from retrain.data.datamodule import ImageFolderDataModule
from retrain.data.splits import DataSplits, discover
from retrain.data.transforms import preprocessing
from retrain.model.module import ClassifierModule
from retrain.model.resnet import build_resnet

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["a", "b", "c", "d"]
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])
PREDICTED = np.array([0, 0, 1, 1, 2, 2, 2, 0, 0])
CONFIDENCE = np.array([0.9, 0.8, 0.55, 0.7, 0.95, 0.6, 0.65, 0.85, 0.75])
# Worked by hand. Confusion rows (true) x columns (predicted): a [2 1 0 0], b [0 1 1 0], c [1 0 2 0], d [1 0 0 0].
# a: 4 predicted a, 2 right -> P 2/4; 3 true a, 2 found -> R 2/3; F1 = 2PR/(P+R) = 4/7.
# d: never predicted -> P 0 (nothing to divide by), R 0/1, F1 0.
HAND = {
    "a": (0.5, 2 / 3, 4 / 7, 3),
    "b": (0.5, 0.5, 0.5, 2),
    "c": (2 / 3, 2 / 3, 2 / 3, 3),
    "d": (0.0, 0.0, 0.0, 1),
}


def _probs(predicted: np.ndarray, confidence: np.ndarray, num_classes: int) -> np.ndarray:
    probs = np.repeat(((1 - confidence) / (num_classes - 1))[:, None], num_classes, axis=1)
    probs[np.arange(len(predicted)), predicted] = confidence
    return probs.astype(np.float32)


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report for the fixed 9-image set, with an unfreeze milestone, test metrics and a skipped bad file."""
    tmp = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    paths = []
    for i, label in enumerate(LABELS):
        path = tmp / "images" / CLASSES[label] / f"{i}.png"
        write_image(path, int(label), rng)
        paths.append(str(path))
    val_acc = [0.25, 0.5, 0.75, 0.625]  # best at epoch 2, then one worse epoch
    history = [
        {"epoch": e, "train/loss": 1.0 / (e + 1), "val/loss": 1.2 / (e + 1), "train/acc": e / 4, "val/acc": acc}
        for e, acc in enumerate(val_acc)
    ]
    inputs = ReportInputs(
        title="Report: toy v007",
        class_names=CLASSES,
        history=history,
        predictions=Predictions(_probs(PREDICTED, CONFIDENCE, 4), LABELS, paths),
        milestones=[{"epoch": 2, "stages": ["layer4"]}],
        weights="the best checkpoint (epoch 2)",
        monitor="val/acc",
        best_epoch=2,
        metrics={"test/acc": 0.625},
        overrides=["data.root=/data/toy", "model.freeze=true"],
        dataset={"root": "/data/toy", "layout": "split", "class_counts": {"train": dict.fromkeys(CLASSES, 5)}},
        bad_files=["/data/toy/train/a/broken.jpg"],
    )
    write_report(inputs, tmp / "report", top_k=3)
    return tmp / "report"


def test_per_class_csv_matches_a_hand_computation(written: Path) -> None:
    with open(written / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["class"] for row in rows] == CLASSES
    for row in rows:
        precision, recall, f1, support = HAND[row["class"]]
        assert float(row["precision"]) == pytest.approx(precision, abs=1e-6)
        assert float(row["recall"]) == pytest.approx(recall, abs=1e-6)
        assert float(row["f1"]) == pytest.approx(f1, abs=1e-6)
        assert int(row["support"]) == support


def test_every_plot_is_a_valid_png_of_sensible_size(written: Path) -> None:
    for name in ("curves.png", "confusion_matrix.png", "top_losses.png"):
        width, height = _png_size(written / name)
        assert 300 <= width <= 4000 and 200 <= height <= 4000, (name, width, height)


def test_top_losses_are_the_most_confident_mistakes_first() -> None:
    # The wrong predictions are images 2, 4, 7 and 8, made with confidence 0.55, 0.95, 0.85 and 0.75.
    assert confident_errors(_probs(PREDICTED, CONFIDENCE, 4), LABELS, k=3) == [4, 7, 8]


def test_confusion_matrix_grows_with_the_class_count_so_50_names_stay_legible(tmp_path: Path) -> None:
    names = [f"class_{i:02d}_with_a_long_name" for i in range(50)]
    plot_confusion(np.eye(50), names, tmp_path / "cm50.png", "val")
    plot_confusion(np.eye(4), names[:4], tmp_path / "cm4.png", "val")
    width50, height50 = _png_size(tmp_path / "cm50.png")
    width4, _ = _png_size(tmp_path / "cm4.png")
    assert width50 > 2 * width4
    assert height50 / 50 >= 25  # at least 25 px per row: room for a 7 pt label


def test_report_md_embeds_the_plots_and_lists_metrics_overrides_and_bad_files(written: Path) -> None:
    text = (written / "report.md").read_text()
    for name in ("curves.png", "confusion_matrix.png", "top_losses.png"):
        assert f"]({name})" in text
    assert "| metric | best epoch (2) | last epoch (3) |" in text and "| val/acc | 0.7500 | 0.6250 |" in text
    assert "| test/acc | 0.6250 |" in text
    assert "model.freeze=true" in text
    assert "Bad files skipped: 1" in text and "broken.jpg" in text
    assert "| **total** | 20 |" in text


def test_docstring_example_runs() -> None:
    assert doctest.testmod(report_module, raise_on_error=True).attempted >= 2


def _fit(tmp: Path, splits: DataSplits, epochs: int, resume: Path | None, log: str) -> RunReport:
    unfreeze = ProgressiveUnfreeze(["0:fc", "1:layer4"])
    module = ClassifierModule(
        build_resnet("resnet18", 3),
        splits.class_names,
        optimizer=partial(torch.optim.SGD, momentum=0.9),
        lr=0.05,
        frozen=unfreeze.frozen_at(0),
        metadata={"name": "toy", "version": 2, "dataset": splits.summary()},
    )
    report = RunReport(tmp / "run" / "report", top_k=4)
    checkpoint = ModelCheckpoint(tmp / "run" / "ckpt", monitor="val/acc", mode="max", save_last=True)
    trainer = L.Trainer(
        default_root_dir=tmp / "run",
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=[checkpoint, unfreeze, report],
        logger=CSVLogger(tmp / "run", name=log, version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    datamodule = ImageFolderDataModule(splits, image_size=32, batch_size=8, num_workers=0)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    return report


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunReport, RunReport, Path]:
    """Epoch 0 trains the head only; a resumed run trains epoch 1 with layer4 unfrozen by the unfreeze callback."""
    tmp = tmp_path_factory.mktemp("fit")
    splits = discover(make_imagefolder(tmp / "images", per_class=8))
    first = _fit(tmp, splits, 1, None, "csv0")
    resumed = _fit(tmp, splits, 2, tmp / "run" / "ckpt" / "last.ckpt", "csv1")
    return first, resumed, tmp / "run"


def _logged_train_acc(csv_file: Path) -> dict[int, float]:
    with open(csv_file) as f:
        return {int(row["epoch"]): float(row["train/acc"]) for row in csv.DictReader(f) if row.get("train/acc")}


def test_callback_writes_the_report_with_epoch_aligned_train_metrics(fitted) -> None:
    first, resumed, run = fitted
    assert all((run / "report" / name).is_file() for name in REPORT_FILES)
    assert [row["epoch"] for row in resumed.history] == [0, 1]
    assert resumed.history[0] == first.history[0]  # restored from the checkpoint, not lost by the resume
    logged = {**_logged_train_acc(run / "csv0" / "metrics.csv"), **_logged_train_acc(run / "csv1" / "metrics.csv")}
    # Each row holds the train accuracy of its own epoch (not the previous one's, as at val time).
    assert [row["train/acc"] for row in resumed.history] == pytest.approx([logged[0], logged[1]])
    assert all("val/acc" in row and "train/loss" in row for row in resumed.history)
    assert "the best checkpoint (epoch" in (run / "report" / "report.md").read_text()


def test_callback_marks_the_epoch_a_stage_was_unfrozen(fitted) -> None:
    first, resumed, run = fitted
    assert first.milestones == []
    assert resumed.milestones == [{"epoch": 1, "stages": ["layer4"]}]
    assert '"stages": [\n        "layer4"' in (run / "report" / "history.json").read_text()


def test_test_metrics_reach_report_md_after_fit(fitted) -> None:
    _, resumed, run = fitted
    assert finish_report([RunReport(run / "elsewhere")], {"test/acc": 0.5}) is None  # it wrote no report
    assert finish_report([resumed], {"test/acc": 0.4321}) == str(run / "report")
    assert "| test/acc | 0.4321 |" in (run / "report" / "report.md").read_text()


def test_rebuild_without_a_report_takes_milestones_from_the_unfreeze_summary() -> None:
    rows = [
        {"epoch": 0, "trainable": ["fc"]},
        {"epoch": 1, "trainable": ["fc"]},
        {"epoch": 2, "trainable": ["layer4", "fc"]},
    ]
    assert _unfreeze_milestones({"unfreeze": {"history": rows}}) == [{"epoch": 2, "stages": ["layer4"]}]
    assert _unfreeze_milestones({"unfreeze": None}) == []


def test_the_report_reuses_the_best_epochs_val_predictions_instead_of_scoring_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    splits = discover(make_imagefolder(tmp_path / "images", per_class=4))
    scored: list[int] = []
    score = report_module.predict_samples
    monkeypatch.setattr(report_module, "predict_samples", lambda *a, **k: scored.append(1) or score(*a, **k))
    report = _fit(tmp_path, splits, 2, None, "csv")
    assert scored == []  # no second pass over the val images
    assert report.inputs is not None
    best = next(p for p in (tmp_path / "run" / "ckpt").glob("epoch=*.ckpt"))
    net = build_resnet("resnet18", 3)
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    net.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    again = score(net, splits.samples["val"], preprocessing(32))
    np.testing.assert_allclose(report.inputs.predictions.probs, again.probs, atol=1e-5)
    assert report.inputs.predictions.paths == again.paths

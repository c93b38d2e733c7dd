"""Score a split and write the whole report folder: per_class.csv, the three plots, history.json and report.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from retrain.analysis.markdown import render_markdown
from retrain.analysis.per_class import (
    confident_errors,
    confusion_matrix,
    normalize_rows,
    per_class,
    write_per_class_csv,
)
from retrain.analysis.plots import plot_confusion, plot_curves, plot_top_losses
from retrain.artifacts.metadata import Preprocessing
from retrain.data.datamodule import ImageListDataset
from retrain.inference.tta import averaged_probs, tta_transform
from retrain.utils.io import write_json

REPORT_FILES = ("report.md", "curves.png", "confusion_matrix.png", "per_class.csv", "top_losses.png")
HISTORY_FILE = "history.json"


@dataclass
class Predictions:
    """Softmax outputs for one split, with the true labels and image paths in the same order."""

    probs: np.ndarray  # [N, C]
    labels: np.ndarray  # [N]
    paths: list[str]


@dataclass
class ReportInputs:
    """Everything the report shows; the callback fills it during training, `retrain report` from disk."""

    title: str
    class_names: list[str]
    history: list[dict[str, Any]]
    predictions: Predictions
    milestones: list[dict[str, Any]] = field(default_factory=list)  # [{"epoch": 3, "stages": ["layer4"]}]
    split: str = "val"
    weights: str = "the final weights"
    monitor: str | None = None
    best_epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. the test metrics, known after fit
    overrides: list[str] = field(default_factory=list)
    dataset: dict[str, Any] = field(default_factory=dict)
    bad_files: list[str] = field(default_factory=list)


@torch.no_grad()
def predict_samples(
    net: nn.Module,
    samples: list[tuple[str, int]],
    preprocessing: Preprocessing,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    tta: str = "none",
) -> Predictions:
    """Run `net` in eval mode over (path, label) samples with the eval transforms, in file order.

    With `tta` (flip, five_crop) each image's probabilities are the average over its views (inference/tta.py).
    """
    loader = DataLoader(
        ImageListDataset(samples, tta_transform(preprocessing, tta)), batch_size=batch_size, num_workers=num_workers
    )
    was_training = net.training
    net.eval().to(device)
    probs, labels = [], []
    try:
        for images, targets in loader:
            probs.append(averaged_probs(net, images.to(device), tta, preprocessing.crop).cpu())
            labels.append(targets)
    finally:
        net.train(was_training)
    return Predictions(torch.cat(probs).numpy(), torch.cat(labels).numpy(), [path for path, _ in samples])


def per_class_rows(inputs: ReportInputs) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of each class on the scored split."""
    p = inputs.predictions
    return per_class(confusion_matrix(p.labels, p.probs.argmax(axis=1), len(inputs.class_names)), inputs.class_names)


def write_markdown(inputs: ReportInputs, out_dir: Path) -> Path:
    """(Re)write report.md alone, e.g. once the test metrics are known."""
    path = Path(out_dir) / "report.md"
    path.write_text(render_markdown(inputs, per_class_rows(inputs)))
    return path


def write_report(inputs: ReportInputs, out_dir: Path, *, top_k: int = 16) -> list[Path]:
    """Write every report file into `out_dir` and return their paths (report.md first)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    p, names = inputs.predictions, inputs.class_names
    predicted = p.probs.argmax(axis=1)
    matrix = confusion_matrix(p.labels, predicted, len(names))
    write_per_class_csv(per_class(matrix, names), out_dir / "per_class.csv")
    plot_curves(inputs.history, inputs.milestones, out_dir / "curves.png")
    plot_confusion(
        normalize_rows(matrix), names, out_dir / "confusion_matrix.png", f"{inputs.split} split, each row sums to 1"
    )
    errors = [
        {
            "path": p.paths[i],
            "true": names[int(p.labels[i])],
            "pred": names[int(predicted[i])],
            "confidence": float(p.probs[i, predicted[i]]),
        }
        for i in confident_errors(p.probs, p.labels, top_k)
    ]
    plot_top_losses(errors, out_dir / "top_losses.png", f"most confident mistakes on {inputs.split}")
    write_json(out_dir / HISTORY_FILE, {"history": inputs.history, "milestones": inputs.milestones})
    write_markdown(inputs, out_dir)
    return [out_dir / name for name in REPORT_FILES]

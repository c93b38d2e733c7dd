"""What test-time augmentation gains on labelled images, and what it costs: the same images scored both ways.

eval.py writes the result into results.json (`tta`), so a user decides with numbers whether `tta=flip` or
`tta=five_crop` is worth its time for their model and data.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from retrain.analysis.report_files import predict_samples
from retrain.artifacts.metadata import Preprocessing
from retrain.inference.tta import MODES


def accuracies(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and balanced accuracy (the mean recall of the classes present) of the most likely class."""
    predicted = probs.argmax(axis=1)
    recalls = [float((predicted[labels == c] == c).mean()) for c in np.unique(labels)]
    return {"acc": float((predicted == labels).mean()), "bal_acc": float(np.mean(recalls))}


def compare_tta(
    net: nn.Module,
    samples: list[tuple[str, int]],
    pre: Preprocessing,
    mode: str,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Score the same images without and with `mode`'s views, each pass timed from file to probabilities."""
    scores: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for name, used in (("plain", "none"), ("tta", mode)):
        start = time.perf_counter()
        predictions = predict_samples(
            net, samples, pre, device=device, batch_size=batch_size, num_workers=num_workers, tta=used
        )
        seconds[name] = time.perf_counter() - start
        scores[name] = accuracies(predictions.probs, predictions.labels)
    return {
        "mode": mode,
        "views": MODES[mode],
        "images": len(samples),
        "acc": {name: scores[name]["acc"] for name in scores},
        "bal_acc": {name: scores[name]["bal_acc"] for name in scores},
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "time_ratio": round(seconds["tta"] / seconds["plain"], 2),
    }

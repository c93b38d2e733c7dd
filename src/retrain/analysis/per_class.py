"""Per-class numbers from predictions: confusion matrix, precision/recall/F1/support, the most confident errors."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support")


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with rows = true class and columns = predicted class, so row i sums to class i's support."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    return matrix


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the recall view); a class with no images keeps a row of zeros."""
    sums = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, sums, out=np.zeros(matrix.shape, dtype=np.float64), where=sums > 0)


def per_class(matrix: np.ndarray, class_names: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class; a ratio with nothing to divide by is 0, as in sklearn."""
    true_pos = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, support, out=np.zeros_like(true_pos), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(true_pos), where=denom > 0)
    return [
        {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
    ]


def write_per_class_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """per_class.csv: one row per class in index order, ratios to 6 decimals."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PER_CLASS_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})


def confident_errors(probs: np.ndarray, labels: np.ndarray, k: int) -> list[int]:
    """Indices of up to k misclassified samples, the most confident wrong prediction first."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probs[wrong, predicted[wrong]]
    # Stable sort on negated confidence: ties keep file order, so the grid is reproducible.
    return [int(i) for i in wrong[np.argsort(-confidence, kind="stable")][:k]]

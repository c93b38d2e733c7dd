"""Top-k predictions per image, written as CSV (one row per image) or JSON."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch

from retrain.errors import ConfigError
from retrain.utils.io import atomic_write

OUTPUT_FORMATS = ("csv", "json")


def top_k(logits: torch.Tensor, class_names: list[str], k: int) -> list[list[tuple[str, float]]]:
    """The k most likely (label, probability) pairs of each row of logits, most likely first."""
    probs = logits.float().softmax(dim=1)
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        [(class_names[i], round(float(p), 6)) for p, i in zip(row_p, row_i, strict=True)]
        for row_p, row_i in zip(values.tolist(), indices.tolist(), strict=True)
    ]


def output_format(output: Path, requested: str | None) -> str:
    """csv or json: as requested, else from the output file's suffix (csv when it says neither)."""
    fmt = (requested or ("json" if output.suffix.lower() == ".json" else "csv")).lower()
    if fmt not in OUTPUT_FORMATS:
        raise ConfigError(
            f"predict.format={requested!r} is unknown; expected csv or json (or null: from output's suffix)."
        )
    return fmt


def write_predictions(rows: list[dict[str, Any]], path: Path, fmt: str, k: int) -> None:
    """Write one record per image: path, top-k labels and probabilities, and the error if it could not be read."""
    if fmt == "json":
        records = [
            {"path": r["path"], "top_k": [{"label": lab, "prob": p} for lab, p in r["top_k"]], "error": r["error"]}
            for r in rows
        ]
        text = json.dumps(records, indent=2, ensure_ascii=False) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", *[f"{name}_{i}" for i in range(1, k + 1) for name in ("label", "prob")], "error"])
        for r in rows:
            pairs = [value for pair in r["top_k"] for value in pair]
            writer.writerow([r["path"], *pairs, *[""] * (2 * k - len(pairs)), r["error"] or ""])
        text = buffer.getvalue()
    atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))

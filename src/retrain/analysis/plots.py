"""The report's PNGs, drawn with matplotlib's object API (no pyplot state, so it is safe in notebooks and threads)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageOps

from retrain.data.images import open_rgb

DPI = 100
# Past this many classes the cells are too small for numbers; the colour alone carries the value.
ANNOTATE_MAX_CLASSES = 20
THUMBNAIL_PX = 128


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, facecolor="white")


def plot_curves(history: list[dict[str, Any]], milestones: list[dict[str, Any]], path: Path) -> None:
    """Train and val loss and accuracy per epoch, with a dashed line where stages were unfrozen."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    panels = [("loss", fig.add_subplot(1, 2, 1)), ("acc", fig.add_subplot(1, 2, 2))]
    for metric, ax in panels:
        for stage, style in (("train", "o-"), ("val", "s-")):
            points = [(row["epoch"], row[f"{stage}/{metric}"]) for row in history if f"{stage}/{metric}" in row]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, style, label=f"{stage}/{metric}", markersize=4)
        for milestone in milestones:
            ax.axvline(milestone["epoch"] - 0.5, color="grey", linestyle="--", linewidth=1)
            ax.annotate(
                "unfreeze " + ",".join(milestone["stages"]),
                (milestone["epoch"] - 0.5, 1.0),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
                color="grey",
            )
        ax.set_xlabel("epoch")
        ax.set_title("accuracy" if metric == "acc" else "loss")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.text(0.5, 0.5, "no completed epoch", ha="center", va="center", transform=ax.transAxes)
    if panels[1][1].lines:
        panels[1][1].set_ylim(-0.02, 1.02)
    _save(fig, path)


def plot_confusion(normalized: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    """The row-normalized confusion matrix; the figure grows with the class count so 50 names stay legible."""
    n = len(class_names)
    side = min(22.0, max(5.0, 0.3 * n + 2.5))
    fontsize = 9 if n <= 20 else max(6, int(350 / n))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(normalized, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(n), labels=class_names, rotation=90 if n > 8 else 45, ha="center" if n > 8 else "right")
    ax.set_yticks(range(n), labels=class_names)
    ax.tick_params(labelsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= ANNOTATE_MAX_CLASSES:
        for (i, j), value in np.ndenumerate(normalized):
            if value > 0:
                colour = "white" if value > 0.5 else "black"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=fontsize - 1, color=colour)
    _save(fig, path)


def _thumbnail(path: str) -> Image.Image:
    # The centre square, as the eval transforms crop it; a file that no longer opens shows as grey.
    try:
        return ImageOps.fit(open_rgb(path), (THUMBNAIL_PX, THUMBNAIL_PX))
    except (OSError, ValueError):
        return Image.new("RGB", (THUMBNAIL_PX, THUMBNAIL_PX), (128, 128, 128))


def plot_top_losses(errors: list[dict[str, Any]], path: Path, title: str) -> None:
    """A grid of misclassified images, each captioned with its true and predicted class and the confidence."""
    if not errors:
        fig = Figure(figsize=(5, 2))
        fig.text(0.5, 0.5, f"{title}\n\nno misclassified images", ha="center", va="center")
        _save(fig, path)
        return
    cols = min(4, len(errors))
    rows = math.ceil(len(errors) / cols)
    fig = Figure(figsize=(2.6 * cols, 2.8 * rows + 0.3), layout="constrained")
    fig.suptitle(title)
    for i, error in enumerate(errors):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(_thumbnail(error["path"]))
        ax.set_axis_off()
        ax.set_title(
            f"true: {error['true']}\npred: {error['pred']} ({error['confidence']:.2f})", fontsize=9, color="darkred"
        )
    _save(fig, path)

"""Class balance for lopsided folders: loss weights per class, and a sampler that draws every class equally often.

`model.class_weights=balanced` weights the training loss by n / (k * count_c), sklearn's `class_weight="balanced"`;
`data.sampler=balanced` draws each epoch's images with replacement, every class with the same probability. Both
make the rare classes count as much as the common ones, which plain accuracy hides and `val/bal_acc` shows.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from retrain.errors import ConfigError, DataError

SAMPLERS = ("shuffle", "balanced")  # data.sampler


def loss_weights(setting: Any, counts: Mapping[str, int]) -> list[float] | None:
    """The per-class weights `model.class_weights` asks for, in class order; None for the plain loss.

    `counts` holds the train images of each class, in class-index order. `balanced` gives n / (k * count_c), so
    a class with the average count weighs 1; a list gives one weight per class.
    """
    if setting is None or str(setting).lower() in ("none", "false"):
        return None
    names = list(counts)
    if str(setting).lower() == "balanced":
        empty = [name for name in names if counts[name] <= 0]
        if empty:
            raise DataError(
                f"model.class_weights=balanced: the classes {empty} have no train images, so their weight "
                "n / (k * count) is undefined. Expected every class in train. Fix: add images to those classes."
            )
        total = sum(counts.values())
        return [total / (len(names) * counts[name]) for name in names]
    if isinstance(setting, str) or not isinstance(setting, Sequence):
        raise ConfigError(
            f"model.class_weights={setting!r}; expected null, balanced, or a list of one weight per class in the "
            f"order {names}. Fix: model.class_weights=balanced, or e.g. "
            f"model.class_weights=[{','.join(['1.0'] * len(names))}]."
        )
    weights = list(setting)
    if len(weights) != len(names) or not all(_positive(w) for w in weights):
        raise ConfigError(
            f"model.class_weights={weights} gives {len(weights)} weights for {len(names)} classes {names}. "
            f"Expected one positive, finite number per class, in that order. Fix: e.g. "
            f"model.class_weights=[{','.join(['1.0'] * len(names))}], or model.class_weights=balanced."
        )
    return [float(w) for w in weights]


def _positive(value: Any) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and number > 0


def check_sampler(name: Any) -> str:
    """`data.sampler`, checked: shuffle (every image once per epoch) or balanced."""
    text = str(name)
    if text not in SAMPLERS:
        raise ConfigError(
            f"data.sampler={name!r} is not a sampler. Expected one of {list(SAMPLERS)}: shuffle draws every image "
            "once per epoch, balanced draws every class equally often. Fix: data.sampler=balanced or shuffle."
        )
    return text


class BalancedSampler(DistributedSampler):
    """Each epoch, one draw with replacement in which every class is equally likely, shared out among the ranks.

    The draw is seeded from (seed, epoch) and is the same on every rank; rank r takes positions r, r + R, ... of
    it, so the ranks see disjoint shards of one global draw, and a resumed run draws the epoch it stopped in
    again. It is a DistributedSampler, which Lightning neither replaces nor wraps under DDP, and whose
    `set_epoch` Lightning calls at every epoch start. An epoch has as many draws as the dataset has images
    (rounded up to a multiple of the rank count).

    >>> sampler = BalancedSampler([0, 0, 0, 0, 0, 0, 1, 1], seed=0)
    >>> len(sampler), sorted(Counter(sampler.labels[i] for i in sampler).keys())
    (8, [0, 1])
    """

    def __init__(self, labels: Sequence[int], *, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if not labels:
            raise DataError("data.sampler=balanced has no train images to draw from. Fix: add images to train.")
        # DistributedSampler reads only the dataset's length, which the labels have.
        super().__init__(labels, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        self.labels = list(labels)
        counts = Counter(self.labels)
        self.weights = torch.tensor([1.0 / counts[label] for label in self.labels], dtype=torch.float64)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator)
        return iter(draw[self.rank : self.total_size : self.num_replicas].tolist())

"""MixUp and CutMix for training batches, as in timm's and torchvision's recipes, with soft labels out."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2

from retrain.errors import ConfigError


class BatchMixing:
    """A DataLoader collate_fn: stack the samples, then blend each batch with MixUp or CutMix (one, picked at random).

    Labels come out as (batch, classes) probabilities, which cross-entropy takes as they are. It runs in the
    loader workers, so it costs the training process nothing, and it is seeded like the rest of the augmentation.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ConfigError(
                f"data.mixup_alpha={mixup_alpha} / data.cutmix_alpha={cutmix_alpha}: expected 0 (off) or a "
                "positive Beta-distribution alpha, e.g. data.mixup_alpha=0.2 data.cutmix_alpha=1.0."
            )
        mixers = [
            mixer(alpha=alpha, num_classes=num_classes)
            for mixer, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha))
            if alpha > 0
        ]
        if not mixers:
            raise ConfigError("BatchMixing needs data.mixup_alpha or data.cutmix_alpha above 0 (both 0: no mixing).")
        self.mix = v2.RandomChoice(mixers) if len(mixers) > 1 else mixers[0]

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> Any:
        """One training batch: images blended in pairs, labels as the matching class probabilities."""
        return self.mix(*default_collate(samples))

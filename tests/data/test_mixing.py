"""data.mixup_alpha / data.cutmix_alpha: training batches blended with soft labels; eval batches untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clitools import FAST, composed

from retrain.artifacts.formats import read_artifact
from retrain.data.mixing import BatchMixing
from retrain.errors import ConfigError
from retrain.model.feature_cache import cache_blockers
from retrain.tasks.common import find_splits, make_datamodule
from retrain.tasks.train import train

MIXING = ("data.mixup_alpha=0.4", "data.cutmix_alpha=1.0")


def test_train_batches_carry_class_probabilities_and_eval_batches_stay_plain(tmp_path: Path, imagefolder: Path) -> None:
    cfg = composed(tmp_path, f"data.root={imagefolder}", *FAST, *MIXING)
    data = make_datamodule(find_splits(cfg.data), cfg.data)
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and labels.shape == (8, 3)
    assert torch.allclose(labels.sum(dim=1), torch.ones(8))
    assert (labels.max(dim=1).values < 1).any()  # blended: some rows are not one-hot
    _, val_labels = next(iter(data.val_dataloader()))
    assert val_labels.dtype == torch.int64 and val_labels.ndim == 1
    plain = make_datamodule(find_splits(cfg.data), composed(tmp_path, f"data.root={imagefolder}", *FAST).data)
    assert next(iter(plain.train_dataloader()))[1].ndim == 1  # off by default


def test_a_run_with_mixing_trains_records_it_and_keeps_the_feature_cache_off(tmp_path: Path, imagefolder: Path) -> None:
    overrides = ("trainer.max_epochs=1", "data.augment=none", "model.freeze=true", "save.publish=false")
    results = train(composed(tmp_path, f"data.root={imagefolder}", *FAST, *MIXING, *overrides))
    assert results["status"] == "ok" and 0 <= results["history"][-1]["val/acc"] <= 1
    assert results["feature_cache"]["enabled"] is False
    assert any("mixup_alpha" in reason for reason in results["feature_cache"]["blocked_by"])
    dataset = read_artifact(Path(results["best_checkpoint"])).metadata["dataset"]
    assert (dataset["mixup_alpha"], dataset["cutmix_alpha"]) == (0.4, 1.0)  # the artifact says how it was trained


def test_mixing_blocks_the_feature_cache_by_name() -> None:
    valid = {"frozen": ["stem", "layer1", "layer2", "layer3", "layer4"], "train_bn": False, "augment": "none"}
    assert cache_blockers(**valid, unfreezes_later=False) == []
    assert cache_blockers(**valid, unfreezes_later=False, mixes_batches=True) == [
        "data.mixup_alpha/cutmix_alpha blend the images of every batch anew (needs both 0)"
    ]


def test_a_negative_alpha_says_what_is_expected() -> None:
    with pytest.raises(ConfigError, match=r"data.mixup_alpha=-0.2.*positive Beta-distribution alpha"):
        BatchMixing(3, mixup_alpha=-0.2)

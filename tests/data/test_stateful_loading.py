"""The train loader's state: a loader stopped mid-epoch and rebuilt from its state_dict serves the rest exactly."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch

from retrain.data.datamodule import ImageFolderDataModule
from retrain.data.splits import discover


def loader(imagefolder: Path, sampler: str = "shuffle", workers: int = 2) -> torch.utils.data.DataLoader:
    """The train loader of a real run: light augmentation, MixUp/CutMix and (two) worker processes."""
    data = ImageFolderDataModule(
        discover(imagefolder),
        image_size=32,
        batch_size=4,
        num_workers=workers,
        persistent_workers=False,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        sampler=sampler,
    )
    return data.train_dataloader()


@pytest.mark.parametrize("sampler", ["shuffle", "balanced"])
def test_a_loader_resumed_from_its_state_serves_the_same_augmented_batches(imagefolder: Path, sampler: str) -> None:
    torch.manual_seed(0)
    straight = list(loader(imagefolder, sampler))
    assert len(straight) >= 4

    torch.manual_seed(0)
    stopped = loader(imagefolder, sampler)
    batches = iter(stopped)
    served = [next(batches) for _ in range(3)]  # worker 0 served two batches, worker 1 one
    buffer = io.BytesIO()
    torch.save(stopped.state_dict(), buffer)  # as in a checkpoint, which must load without unpickling code
    del batches
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    torch.manual_seed(1234)  # whatever the process's random state, the state_dict decides
    resumed = loader(imagefolder, sampler)
    resumed.load_state_dict(state)
    served += list(resumed)

    assert len(served) == len(straight)
    for (images, labels), (expected_images, expected_labels) in zip(served, straight, strict=True):
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_a_state_saved_with_another_worker_count_is_set_aside_with_a_warning(
    imagefolder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    two = loader(imagefolder)
    batches = iter(two)
    next(batches)
    state = two.state_dict()
    del batches
    none = loader(imagefolder, workers=0)
    with caplog.at_level(logging.WARNING, logger="retrain"):
        none.load_state_dict(state)  # torchdata itself would fail an assert when the epoch's iterator starts
    assert "run with 2 loader worker(s), this run with 0 (data.num_workers)" in caplog.text
    assert len(list(none)) == len(two)  # the whole epoch, from its start

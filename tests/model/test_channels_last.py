"""model.channels_last=auto: NHWC where it is faster (CPU from 96 px, GPU with 16-bit precision), NCHW elsewhere."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from retrain.model.module import ClassifierModule, channels_last_pays
from retrain.model.resnet import build_resnet


@pytest.mark.parametrize(
    ("device", "precision", "size", "expected"),
    [
        ("cpu", "32-true", 224, True),
        ("cpu", "32-true", 96, True),
        ("cpu", "32-true", 64, False),  # measured 0.91x at 32 px: small maps do not pay for the layout
        ("cpu", "32-true", None, False),
        ("cuda", "bf16-mixed", 32, True),
        ("cuda", "16-mixed", 224, True),
        ("cuda", "32-true", 224, False),
        ("mps", "32-true", 224, False),
    ],
)
def test_auto_picks_nhwc_only_where_it_pays(device: str, precision: str, size: int | None, expected: bool) -> None:
    assert channels_last_pays(device, precision, size) is expected


@pytest.mark.parametrize(("size", "nhwc"), [(96, True), (32, False)])
def test_auto_is_decided_when_training_starts_and_the_weights_follow(size: int, nhwc: bool) -> None:
    module = ClassifierModule(
        build_resnet("resnet18", 2),
        ["a", "b"],
        optimizer=partial(torch.optim.SGD, momentum=0.9),
        channels_last="auto",
        metadata={"preprocessing": {"crop": size}},
    )
    conv1 = module.model.conv1.weight
    assert not conv1.is_contiguous(memory_format=torch.channels_last)
    before = conv1.detach().clone()
    images = TensorDataset(torch.randn(4, 3, size, size), torch.tensor([0, 1, 0, 1]))
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=1, logger=False, enable_progress_bar=False)
    trainer.fit(module, train_dataloaders=DataLoader(images, batch_size=2))
    assert module.channels_last is nhwc
    assert module.model.conv1.weight is conv1  # converted in place: the optimizer trained the same tensor
    assert conv1.is_contiguous(memory_format=torch.channels_last) is nhwc
    assert not torch.equal(conv1.detach(), before)  # one optimizer step moved it

"""Head-only transfer across a shift (issue 16): pretrained at 32 px, retrained at 64 px on images that look nothing
like the pretraining ones. The default (model.bn_stats=auto: the frozen stages' BatchNorm statistics re-estimated on
the new images) beats the pretrained statistics, and scores as the plain PyTorch loop does.

The "pretrained" backbone is what a user holds: a state_dict whose BatchNorm statistics were set by bright,
high-contrast 32 px images (domain A). The new task (domain B) is dark, flat 64 px images whose classes are a faint
colour tint under noise: a linear head on healthy features separates them at once. Through A's statistics the
activations of B grow layer after layer (features ~30x those of the adapted backbone), and a head trained on them
at the same learning rate does not find the tints. Three short seeded runs in one process: retrain's default,
model.bn_stats=frozen, and the plain loop of bench/frozen_head.py (BatchNorm in train mode drifts towards B).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from clitools import FAST, composed
from frozen_head import plain_loop
from PIL import Image
from torch import nn

from retrain.tasks.train import train

EPOCHS = 4
BATCH = 8
SIZE = 64  # the new task's crop; images are written at the eval resize (64 * 256 / 224 = 73 px)
SEED = 0
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHORT_RUN = (
    *FAST,
    f"data.image_size={SIZE}",
    f"data.batch_size={BATCH}",
    f"trainer.max_epochs={EPOCHS}",
    "model.freeze=true",
    "data.augment=none",
    "model.lr=0.001",  # the plain loop's recipe: SGD(fc, lr=0.001, momentum=0.9), constant, no weight decay
    "model.weight_decay=0",
    "model/scheduler=none",
    f"seed={SEED}",
    "test=false",
    "save.publish=false",
    "callbacks=none",
    "~logger",
    "trainer.num_sanity_val_steps=0",
)
MARGIN = 0.2  # accuracy points the default must gain over frozen statistics
PLAIN_TOLERANCE = 0.02  # the default may trail the plain loop by at most this


def pretrained_at_32px(path: Path) -> Path:
    """A seeded 5-class ResNet18 whose BatchNorm statistics are those of 64 bright, high-contrast 32 px images."""
    images = np.random.default_rng(SEED).uniform(0, 255, (64, 3, 32, 32)).astype(np.float32)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.manual_seed(SEED)
    net = torchvision.models.resnet18(num_classes=5)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a cumulative average: the statistics of exactly these images
    net.train()
    with torch.no_grad():
        net((torch.from_numpy(images) / 255 - mean) / std)
    torch.save(net.state_dict(), path)
    return path


def dark_tints(root: Path, *, train: int, val: int) -> Path:
    """root/{train,val}/{red,green,blue}/*.png: near-black 73 px images, the class's channel lifted by 6 of 255."""
    rng = np.random.default_rng(SEED + 1)
    side = round(SIZE * 256 / 224)
    for split, count in (("train", train), ("val", val)):
        for label, name in enumerate(("red", "green", "blue")):
            for i in range(count):
                pixels = 8 + rng.normal(0, 4, (side, side, 3))
                pixels[..., label] += 6
                path = root / split / name / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
    return root


def val_acc(tmp_path: Path, root: Path, weights: Path, *options: str) -> tuple[float, dict]:
    """Final val accuracy of a head-only retrain run, and its bn_stats record."""
    tmp_path.mkdir()
    results = train(composed(tmp_path, f"data.root={root}", f"model.init_from={weights}", *SHORT_RUN, *options))
    return float(results["final"]["val/acc"]), results["bn_stats"]


@pytest.fixture(scope="module")
def scores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float | dict]:
    """The three runs on one task: 72 train and 24 val images at 64 px, 4 epochs of batch 8 (36 steps: enough for
    the plain loop's BatchNorm, momentum 0.1, to drift most of the way to B)."""
    tmp = tmp_path_factory.mktemp("bn_transfer")
    weights = pretrained_at_32px(tmp / "pretrained_32px.pth")
    root = dark_tints(tmp / "images", train=24, val=8)
    default, record = val_acc(tmp / "default", root, weights)
    frozen, _ = val_acc(tmp / "frozen", root, weights, "model.bn_stats=frozen")
    plain = plain_loop(str(root), str(weights), SIZE, EPOCHS, BATCH, 0, SEED)
    return {"default": default, "frozen": frozen, "plain": plain, "record": record}


def test_default_adapts_and_beats_the_pretrained_statistics(scores: dict) -> None:
    assert scores["default"] >= scores["frozen"] + MARGIN, scores
    assert scores["record"]["setting"] == "adapt" and scores["record"]["images"] == 72, scores


def test_default_matches_the_plain_loop_within_two_points(scores: dict) -> None:
    assert scores["default"] >= scores["plain"] - PLAIN_TOLERANCE, scores

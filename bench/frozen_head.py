"""Frozen-head fine-tuning: retrain's feature cache against the plain PyTorch loop, on the same images.

    python bench/frozen_head.py            # 480 images at 224 px (336 train, 144 val), batch 32, 10 epochs
    python bench/frozen_head.py --quick    # a smoke run: 60 images at 64 px, 3 epochs
    python bench/frozen_head.py --root DIR --init-from IMAGENET1K_V1   # your ImageFolder (train/, val/) and weights

The plain loop is the classic "ConvNet as fixed feature extractor": requires_grad=False on every parameter, a new
fc, SGD(fc, lr=0.001, momentum=0.9), and every epoch a full pass over the train and val images. Its backbone runs
in eval mode, as retrain's default `model.train_bn=false` does, so both sides train the same model. retrain runs the
same training through ClassifierModule and a Trainer with the frozen-feature cache (data.augment=none). Both start
from the same weights and head, shuffle with the same per-epoch seeds, load images with the same number of workers,
validate every epoch and save nothing; the clock covers the 10 epochs of each (for retrain, the whole
`trainer.fit`, cache building included). Prints a markdown table for the README.

Without network there are no pretrained weights, so by default the backbone is a seeded random init and the images
are generated: 6 classes told apart by their colour tint under heavy noise, which random convolutional features can
separate (the demo set's shapes need learned features: a frozen random backbone stays at chance on them).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torchvision
from _machine import Row, parse_args, print_report, ratio
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models import ResNet

from retrain.artifacts.sources import load_source
from retrain.data.datamodule import ImageFolderDataModule, default_num_workers
from retrain.data.splits import discover
from retrain.data.transforms import eval_transforms, preprocessing
from retrain.model.feature_cache import FeatureCache
from retrain.model.module import ClassifierModule
from retrain.model.resnet import build_resnet
from retrain.model.surgery import BACKBONE, apply_freeze, load_weights

REPO = Path(__file__).resolve().parents[1]


TINTS = ((200, 70, 70), (70, 200, 70), (70, 70, 200), (200, 200, 70), (200, 70, 200), (70, 200, 200))


def build_tinted_set(root: Path, *, per_class: int, size: int, seed: int) -> Path:
    """Write root/{train,val}/<class>/*.jpg (70% / 30%), each image a class tint under noise; reuse a finished set."""
    if (root / "val").is_dir():
        return root
    rng = np.random.default_rng(seed)
    staging = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    n_train = round(per_class * 0.7)
    for label, tint in enumerate(TINTS):
        for i in range(per_class):
            folder = staging / ("train" if i < n_train else "val") / f"tint{label}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.asarray(tint, dtype=float) * rng.uniform(0.5, 1.0) + rng.normal(0, 70, (size, size, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
    staging.rename(root)  # a half-written set is never mistaken for a finished one
    return root


def initial_model(num_classes: int, init_from: str | None, seed: int) -> ResNet:
    """The starting weights both loops share: `init_from` (e.g. IMAGENET1K_V1) or a seeded random init."""
    torch.manual_seed(seed)
    model = build_resnet("resnet18", num_classes)
    if init_from:
        load_weights(model, load_source(init_from, model_dir=REPO / "models").state_dict, source=init_from)
    return model


@dataclass(frozen=True)
class Setup:
    """What both loops share: the images, their size, batching, epochs, loader workers and seed."""

    root: Path
    size: int
    batch_size: int
    epochs: int
    workers: int
    seed: int


@dataclass
class Result:
    """One loop's wall time, CPU time (this process and its finished loader workers) and final val accuracy."""

    seconds: float
    cpu_seconds: float
    accuracy: float


class Clock:
    """Wall and CPU time of a block; CPU time counts loader workers once they have exited."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, _cpu() - self.cpu


def _cpu() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def plain_loop(start: ResNet, setup: Setup) -> Result:
    """The plain PyTorch loop, timed over all epochs."""
    model = copy.deepcopy(start)
    for param in model.parameters():
        param.requires_grad = False
    head = nn.Linear(model.fc.in_features, model.fc.out_features)
    head.load_state_dict(start.fc.state_dict())  # the same initial head as retrain's, for a like-for-like run
    model.fc = head
    transform = eval_transforms(preprocessing(setup.size))
    train_set = torchvision.datasets.ImageFolder(str(setup.root / "train"), transform)
    val_set = torchvision.datasets.ImageFolder(str(setup.root / "val"), transform)
    train = DataLoader(train_set, batch_size=setup.batch_size, shuffle=True, num_workers=setup.workers)
    val = DataLoader(val_set, batch_size=setup.batch_size, num_workers=setup.workers)
    optimizer = torch.optim.SGD(model.fc.parameters(), lr=0.001, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    accuracy = 0.0
    with Clock() as clock:
        for epoch in range(setup.epochs):
            # Seeded per epoch, as retrain seeds each epoch: both loops then shuffle the images into the same batches.
            torch.manual_seed(setup.seed + epoch)
            model.eval()  # frozen BatchNorm: its statistics stay as loaded
            for images, labels in train:
                optimizer.zero_grad()
                criterion(model(images), labels).backward()
                optimizer.step()
            correct = total = 0
            with torch.no_grad():
                for images, labels in val:
                    correct += int((model(images).argmax(1) == labels).sum())
                    total += len(labels)
            accuracy = correct / total
    return Result(clock.wall, clock.cpu, accuracy)


def retrain_loop(start: ResNet, setup: Setup, dtype: str) -> tuple[Result, dict]:
    """The same training through retrain with the feature cache, timed over `trainer.fit`; also the cache's summary."""
    splits = discover(setup.root)
    images = ImageFolderDataModule(
        splits, image_size=setup.size, augment="none", batch_size=setup.batch_size, num_workers=setup.workers
    )
    net = copy.deepcopy(start)
    apply_freeze(net, BACKBONE)
    optimizer = partial(torch.optim.SGD, momentum=0.9)
    module = ClassifierModule(
        net, splits.class_names, optimizer=optimizer, lr=0.001, weight_decay=0.0, frozen=BACKBONE, seed=setup.seed
    )
    with tempfile.TemporaryDirectory() as spill:
        cache = FeatureCache(Path(spill), dtype=dtype)
        trainer = L.Trainer(
            max_epochs=setup.epochs,
            accelerator="cpu",
            callbacks=[cache],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        with Clock() as clock:
            trainer.fit(module, datamodule=cache.wrap(images))
    return Result(clock.wall, clock.cpu, float(trainer.callback_metrics["val/acc"])), cache.summary()


def add_flags(parser: argparse.ArgumentParser) -> None:
    """This benchmark's flags, next to the shared --quick."""
    parser.add_argument("--root", type=Path, help="ImageFolder with train/ and val/ (default: generated tints)")
    parser.add_argument("--per-class", type=int, default=80, help="generated images per class (6 classes)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=default_num_workers(), help="loader workers, both loops")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="cached feature type")
    parser.add_argument("--init-from", help="starting weights, e.g. IMAGENET1K_V1 (default: seeded random init)")
    parser.add_argument("--seed", type=int, default=0)


def main() -> None:
    """Build (or reuse) the image set, time both loops, print the table."""
    args = parse_args(__doc__, extra=add_flags)
    if args.quick:  # 60 images at 64 px, 3 epochs: checks the script, the numbers mean nothing
        args.per_class, args.image_size, args.epochs = 10, 64, 3
    root = args.root or build_tinted_set(
        REPO / "data" / "bench" / f"tints-{args.per_class}x{args.image_size}-seed{args.seed}",
        per_class=args.per_class,
        size=args.image_size,
        seed=args.seed,
    )
    splits = discover(root)
    sizes = splits.sizes()
    start = initial_model(len(splits.class_names), args.init_from, args.seed)
    setup = Setup(root, args.image_size, args.batch_size, args.epochs, args.workers, args.seed)
    plain = plain_loop(start, setup)
    ours, cache = retrain_loop(start, setup, args.dtype)
    storage = "in memory" if cache["splits"]["train"]["storage"] == "memory" else "memory-mapped"
    building = sum(split["seconds"] for split in cache["splits"].values())
    epochs = f"{args.epochs} epochs"
    name = f"retrain, feature cache ({cache['dtype']}, {storage})"
    rows = [
        Row(f"plain PyTorch loop: wall time, {epochs}", plain.seconds, "s", 1.0),
        Row(
            f"{name}: wall time, {epochs}",
            ours.seconds,
            "s",
            ratio(ours.seconds, plain.seconds),
            f"{plain.seconds / ours.seconds:.1f}x less; {building:.1f} s of it building the cache",
        ),
        Row(f"plain PyTorch loop: CPU time, {epochs}", plain.cpu_seconds, "s", 1.0, "process + loader workers"),
        Row(
            f"{name}: CPU time, {epochs}",
            ours.cpu_seconds,
            "s",
            ratio(ours.cpu_seconds, plain.cpu_seconds),
            f"{plain.cpu_seconds / ours.cpu_seconds:.1f}x less",
        ),
        Row("plain PyTorch loop: val accuracy", f"{100 * plain.accuracy:.1f}%"),
        Row(
            f"{name}: val accuracy",
            f"{100 * ours.accuracy:.1f}%",
            note=f"{100 * (ours.accuracy - plain.accuracy):+.1f} points",
        ),
    ]
    data = args.root or "generated: 6 classes told apart by colour tint under noise"
    backbone = args.init_from or f"random init (seed {args.seed})"
    print_report(
        "Frozen-head fine-tuning: feature cache vs the plain loop",
        rows,
        notes=[
            f"{sizes['train']} train + {sizes['val']} val images ({data}) at {args.image_size} px, batch "
            f"{args.batch_size}, {args.workers} loader worker(s), backbone {backbone}; plain loop: "
            "requires_grad=False, new fc, SGD(fc, lr=0.001, momentum=0.9); both validate every epoch, save nothing.",
        ],
    )


if __name__ == "__main__":
    main()

"""Class imbalance: balanced accuracy of the plain PyTorch loop and of retrain with and without its two options.

    python bench/imbalance.py            # 3 classes, 300/30/30 train images, 100 a class in val, 32 px, 10 epochs,
                                         # every row trained with 3 seeds (init and data order)
    python bench/imbalance.py --quick    # a smoke run: 30/3/3 images, 1 epoch, 1 seed (numbers meaningless)

The folder (bench/_imbalanced.py) has one class ten times the others, told apart by grey levels that overlap, so
a model trained on the raw counts gives the border regions to the large class. Every row trains ResNet18 from the
same seeded random init with SGD (lr 0.01, momentum 0.9, weight decay 1e-4, no schedule), batch 32, eval transforms
only, for the same number of epochs, and scores the balanced val split (its accuracy is the balanced accuracy).
Trained on the raw counts, where a run ends up depends much on its seed (0.38 to 0.66 in one trial), so each row is
the mean over seeds, its note the range:

- the plain loop of bench/baseline.py (ImageFolder, shuffled DataLoader, CrossEntropyLoss), the baseline;
- retrain's ClassifierModule and Trainer as they are by default;
- with model.class_weights=balanced (the loss weighted n / (k * count_c));
- with data.sampler=balanced (each epoch drawn with every class equally likely).
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from _imbalanced import imbalanced_imagefolder
from _machine import Row, parse_args, print_report, ratio
from baseline import eval_transform
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, models

from retrain.data.balance import loss_weights
from retrain.data.datamodule import ImageFolderDataModule
from retrain.data.splits import discover
from retrain.model.module import ClassifierModule

LR, MOMENTUM, WEIGHT_DECAY, BATCH = 0.01, 0.9, 1e-4, 32


def balanced_accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """The mean of the per-class recalls."""
    return float(np.mean([(predicted[labels == c] == c).mean() for c in np.unique(labels)]))


def plain(root: Path, *, image_size: int, epochs: int, seed: int) -> tuple[float, float]:
    """The by-hand loop: balanced accuracy on val after `epochs`, and the seconds it trained."""
    torch.manual_seed(seed)
    train = datasets.ImageFolder(str(root / "train"), eval_transform(image_size))
    val = datasets.ImageFolder(str(root / "val"), eval_transform(image_size))
    model = models.resnet18(num_classes=len(train.classes))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for inputs, labels in DataLoader(train, batch_size=BATCH, shuffle=True, drop_last=True):
            loss = criterion(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    predicted, truth = [], []
    with torch.no_grad():
        for inputs, labels in DataLoader(val, batch_size=128):
            predicted.append(model(inputs).argmax(1))
            truth.append(labels)
    return balanced_accuracy(torch.cat(predicted).numpy(), torch.cat(truth).numpy()), seconds


def retrain(root: Path, *, image_size: int, epochs: int, seed: int, option: str) -> tuple[float, float]:
    """retrain's module and Trainer with `option` (default, class_weights or sampler): val/bal_acc and seconds."""
    L.seed_everything(seed, workers=True, verbose=False)
    splits = discover(root)
    data = ImageFolderDataModule(
        splits, image_size=image_size, augment="none", batch_size=BATCH, num_workers=0, seed=seed,
        sampler="balanced" if option == "sampler" else "shuffle",
    )  # fmt: skip
    weights = loss_weights("balanced", splits.class_counts()["train"]) if option == "class_weights" else None
    module = ClassifierModule(
        models.resnet18(num_classes=len(splits.class_names)), splits.class_names, seed=seed, lr=LR,
        weight_decay=WEIGHT_DECAY, optimizer=partial(torch.optim.SGD, momentum=MOMENTUM), class_weights=weights,
    )  # fmt: skip
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=epochs,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    return float(trainer.validate(module, datamodule=data, verbose=False)[0]["val/bal_acc"]), seconds


def main() -> None:
    """Train the four rows on one generated folder and print the table."""

    def extra(parser):
        parser.add_argument("--small", type=int, default=30, help="train images of each small class")
        parser.add_argument("--val", type=int, default=100, help="val images of every class")
        parser.add_argument("--epochs", type=int, default=10)
        parser.add_argument("--image-size", type=int, default=32)
        parser.add_argument("--seeds", type=int, default=3, help="runs per row, seeded 0, 1, ...")

    args = parse_args(__doc__, extra)
    if args.quick:
        args.small, args.val, args.epochs, args.seeds = 3, 4, 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        root = imbalanced_imagefolder(Path(tmp) / "images", small=args.small, val=args.val, seed=0)
        runs = {
            "plain loop (no balancing)": partial(plain, root),
            "retrain, default": partial(retrain, root, option="default"),
            "retrain, model.class_weights=balanced": partial(retrain, root, option="class_weights"),
            "retrain, data.sampler=balanced": partial(retrain, root, option="sampler"),
        }
        rows, base = [], 0.0
        for figure, run in runs.items():
            scores = [run(image_size=args.image_size, epochs=args.epochs, seed=seed) for seed in range(args.seeds)]
            values = [value for value, _ in scores]
            mean = sum(values) / len(values)
            base = base or mean
            note = f"{min(values):.3f} to {max(values):.3f}; {sum(s for _, s in scores) / len(scores):.0f} s a run"
            rows.append(Row(figure, mean, "bal_acc", ratio(mean, base), note))
    print_report(
        f"Class imbalance: 3 classes, {10 * args.small}/{args.small}/{args.small} train images, "
        f"{args.val} a class in val, {args.image_size} px, {args.epochs} epochs, {args.seeds} seeds",
        rows,
        notes=["Mean balanced accuracy on the balanced val split (chance: 0.33); note: the seeds' range, time a run."],
    )


if __name__ == "__main__":
    main()

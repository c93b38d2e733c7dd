"""Head-only transfer across a resolution shift on real images: handwritten digits, against the plain loop.

    python bench/real_digits.py           # 537 train + 359 val images at 224 px, 10 epochs
    python bench/real_digits.py --quick   # a smoke run at 64 px, 2 epochs

The images are scikit-learn's 1,797 handwritten digits (8x8 scans of real handwriting, shipped with scikit-learn,
so no network), written as an ImageFolder in data/bench/. A ResNet18 is trained with plain PyTorch at 32 px on the
digits 0-4 and saved as a state_dict; then a new head is trained on the digits 5-9 at 224 px from that state_dict:
the issue's case (a backbone pretrained at a low resolution, transferred at a high one) on real images.

Rows: the plain loop (frozen_head.py's: torchvision's tutorial, BatchNorm drifting in train mode), `python
train.py ... model.freeze=true data.augment=none` with the plain loop's optimizer settings (lr 0.001, no schedule)
and with retrain's own defaults (lr 0.01, cosine), each with the default `model.bn_stats` (adapt) and with `frozen`.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from pathlib import Path

from _machine import Row, parse_args, print_report, ratio
from frozen_head import DATA, Setup, plain_process, retrain_process, train_backbone

SOURCE, TARGET = range(0, 5), range(5, 10)
PRETRAIN_SIZE = 32


def digits_imagefolder(root: Path, digits: range, val_fraction: float, seed: int) -> Path:
    """The scikit-learn digits of `digits` as root/{train,val}/<digit>/*.png (8x8 grey), split at random."""
    if (root / "val").is_dir():
        return root
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    chosen = [i for i in order if labels[i] in digits]
    n_val = round(val_fraction * len(chosen))
    for position, index in enumerate(chosen):
        split = "val" if position < n_val else "train"
        folder = root / split / str(labels[index])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (images[index].reshape(8, 8) * 255 / 16).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{index:04d}.png")
    return root


def pretrained(seed: int) -> Path:
    """A ResNet18 trained with plain PyTorch on the digits 0-4 at 32 px, as a state_dict (kept for reruns)."""
    path = DATA / f"digits-pretrained-{PRETRAIN_SIZE}px-seed{seed}.pth"
    if path.is_file():
        return path
    root = digits_imagefolder(DATA / "digits-0-4", SOURCE, val_fraction=0.2, seed=seed)
    return train_backbone(root / "train", path, size=PRETRAIN_SIZE, epochs=4, batch_size=64, seed=seed)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """This benchmark's flags, next to the shared --quick."""
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=max(0, min(8, (os.cpu_count() or 1) - 1)))
    parser.add_argument("--seed", type=int, default=0)


def main() -> None:
    """Write the digits, pretrain, then time and score the plain loop and retrain's variants."""
    args = parse_args(__doc__, extra=add_flags)
    if args.quick:  # checks the script, the numbers mean nothing
        args.image_size, args.epochs = 64, 2
    setup = Setup(args.image_size, args.epochs, 32, args.workers, per_class=0, seed=args.seed)
    weights = pretrained(args.seed)
    root = digits_imagefolder(DATA / "digits-5-9", TARGET, val_fraction=0.4, seed=args.seed)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = plain_process(root, weights, setup, Path(tmp) / "plain")
        rows += [
            Row("plain loop, wall time", plain.seconds, "s", 1.0),
            Row("plain loop, val accuracy", f"{100 * plain.accuracy:.1f}%"),
        ]
        for label, plain_recipe in (("plain loop's lr 0.001", True), ("retrain's defaults, lr 0.01 cosine", False)):
            for bn_stats in ("auto", "frozen"):
                work = Path(tmp) / f"{plain_recipe}-{bn_stats}"
                override = f"model.bn_stats={bn_stats}"
                run = retrain_process(root, weights, setup, work, override, plain_recipe=plain_recipe)
                setting = (run.results.get("bn_stats") or {}).get("setting", bn_stats)
                rows.append(
                    Row(
                        f"retrain, {label}, bn_stats={setting}: val accuracy",
                        f"{100 * run.accuracy:.1f}%",
                        note=f"{100 * (run.accuracy - plain.accuracy):+.1f} points vs the plain loop; wall "
                        f"{run.seconds:.1f} s ({ratio(run.seconds, plain.seconds) or 0:.2f}x the plain loop's)",
                    )
                )
    n_train = sum(1 for _ in (root / "train").rglob("*.png"))
    n_val = sum(1 for _ in (root / "val").rglob("*.png"))
    print_report(
        f"Head-only transfer on real digits: pretrained at 32 px on 0-4, a new head at {setup.size} px on 5-9",
        rows,
        notes=[
            f"{n_train} train + {n_val} val images (scikit-learn's handwritten digits 5-9, 8x8 scans), batch 32, "
            f"{setup.workers} loader worker(s), {setup.epochs} epochs; backbone trained at {PRETRAIN_SIZE} px on "
            "the digits 0-4 with plain PyTorch. Wall time: process start to exit, imports included.",
        ],
    )


if __name__ == "__main__":
    main()

"""`retrain demo-data [--root DIR]`: build (or reuse) the offline demo set and say what it holds."""

from __future__ import annotations

import argparse
from pathlib import Path

from retrain.data.demo import CLASSES, DEFAULT_PER_CLASS, SPLITS, build_demo_dataset, split_sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `retrain demo-data`'s options."""
    parser.add_argument("--root", type=Path, default=Path("data/demo"), help="output folder (default: data/demo)")
    parser.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS, help="images per class, all splits")
    parser.add_argument("--image-size", type=int, default=64, help="side of the square images in pixels")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same images")
    parser.add_argument("--force", action="store_true", help="rebuild even when a complete set is there")


def run(args: argparse.Namespace) -> int:
    """Build the set and print where it is and what it holds."""
    root = build_demo_dataset(
        args.root, per_class=args.per_class, image_size=args.image_size, seed=args.seed, force=args.force
    )
    sizes = split_sizes(args.per_class)
    print(f"Demo set in {root.resolve()} ({args.image_size} px, seed {args.seed})")
    for split in SPLITS:
        print(f"  {split:<5} {sizes[split] * len(CLASSES):>5} images: {sizes[split]} per class x {len(CLASSES)}")
    print(f"  classes: {', '.join(CLASSES)}")
    return 0

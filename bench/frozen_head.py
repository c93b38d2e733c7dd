"""Head-only transfer: `python train.py ... model.freeze=true` against the plain PyTorch loop, as whole processes.

    python bench/frozen_head.py           # 720 images at 224 px (480 train, 240 val), 10 epochs, two cases
    python bench/frozen_head.py --quick   # a smoke run: 48 images at 64 px, 2 epochs, the shift case alone
    python bench/frozen_head.py --data DIR --weights W.pth   # your own ImageFolder (train/ and val/) and resnet18

Each side is one process, timed from start to exit: imports, data, training, and for retrain the checkpoints, the
report and the registry version it publishes by default. Both start from the same state_dict file, train a new fc
for the same epochs with SGD(lr=0.001, momentum=0.9) on the same images with the same batch size and loader workers,
and validate every epoch. The plain loop is the classic "ConvNet as fixed feature extractor" (torchvision's transfer
learning tutorial): requires_grad=False on the backbone, model.train() while training and model.eval() to validate,
so its frozen BatchNorm statistics drift towards the new images. retrain runs its defaults (feature cache,
model.bn_stats=auto, bf16 extraction where the CPU has it), plus rows with model.bn_stats=frozen and
model.feature_cache_precision=fp32: the evidence for the default.

Two cases, on generated images (no network here): a backbone pretrained on three colour tints under noise at 32 px
(a few epochs of plain PyTorch, kept in data/bench/), then
- shift: transferred at 224 px to three other tints seen as dim, flat scans (a third of the contrast);
- no shift: the same backbone with the statistics of 224-px images of its own domain (re-estimated once, as a
  backbone pretrained at 224 px holds them), transferred at 224 px to three other tints of that domain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _machine import Row, parse_args, print_report, ratio
from _synthetic import TINTS, tinted_imagefolder

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "bench"
SOURCE = {name: TINTS[name] for name in ("red", "green", "blue")}
TARGET = {name: TINTS[name] for name in ("yellow", "magenta", "cyan")}
PRETRAIN_SIZE = 32


@dataclass(frozen=True)
class Setup:
    """What both sides share."""

    size: int
    epochs: int
    batch_size: int
    workers: int
    per_class: int  # train images per class; val gets half as many
    seed: int
    repeats: int = 1  # runs of retrain's defaults (the median counts)


@dataclass
class Result:
    """One process: wall time from start to exit, final val accuracy, and what retrain recorded."""

    seconds: float
    accuracy: float
    results: dict


def plain_loop(root: str, weights: str, size: int, epochs: int, batch_size: int, workers: int, seed: int) -> float:
    """The tutorial's loop; returns the last epoch's val accuracy. Imports nothing from retrain."""
    import torch
    import torchvision
    from baseline import eval_transform
    from torch import nn
    from torch.utils.data import DataLoader

    transform = eval_transform(size)
    train_set = torchvision.datasets.ImageFolder(f"{root}/train", transform)
    val_set = torchvision.datasets.ImageFolder(f"{root}/val", transform)
    train = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers)
    val = DataLoader(val_set, batch_size=batch_size, num_workers=workers)
    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.fc = nn.Linear(512, state["fc.weight"].shape[0])
    model.load_state_dict(state)
    for param in model.parameters():
        param.requires_grad = False
    model.fc = nn.Linear(512, len(train_set.classes))
    optimizer = torch.optim.SGD(model.fc.parameters(), lr=0.001, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    accuracy = 0.0
    for _ in range(epochs):
        model.train()
        for images, labels in train:
            optimizer.zero_grad()
            criterion(model(images), labels).backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in val:
                correct += int((model(images).argmax(1) == labels).sum())
        accuracy = correct / len(val_set)
    return accuracy


def timed(command: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    """Run a process to its exit; its wall time covers interpreter start and imports."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])}... failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return seconds, proc


def plain_process(root: Path, weights: Path, setup: Setup, work: Path) -> Result:
    """The plain loop in a process of its own."""
    spec = [str(root), str(weights), setup.size, setup.epochs, setup.batch_size, setup.workers, setup.seed]
    seconds, proc = timed([sys.executable, str(Path(__file__).resolve()), "--plain-loop", json.dumps(spec)], work)
    return Result(seconds, float(proc.stdout.strip().splitlines()[-1]), {})


def retrain_process(
    root: Path, weights: Path, setup: Setup, work: Path, *overrides: str, plain_recipe: bool = True
) -> Result:
    """`python train.py` as a user types it for this job, in a fresh folder; plain_recipe: with the plain loop's
    optimizer settings (lr 0.001, no weight decay, no schedule) instead of retrain's defaults."""
    recipe = ["model.lr=0.001", "model.weight_decay=0", "model/scheduler=none"] if plain_recipe else []
    command = [
        sys.executable,
        str(REPO / "train.py"),
        f"data.root={root}",
        f"model.init_from={weights}",
        "model.freeze=true",
        "data.augment=none",
        f"data.image_size={setup.size}",
        f"data.batch_size={setup.batch_size}",
        f"data.num_workers={setup.workers}",
        f"trainer.max_epochs={setup.epochs}",
        *recipe,
        f"seed={setup.seed}",
        "extras.print_config=false",
        *overrides,
    ]
    seconds, _ = timed(command, work)
    results = json.loads(next((work / "logs" / "train" / "runs").glob("*/*/results.json")).read_text())
    return Result(seconds, float(results["final"]["val/acc"]), results)


def train_backbone(train_root: Path, path: Path, *, size: int, epochs: int, batch_size: int, seed: int) -> Path:
    """A resnet18 trained from scratch with plain PyTorch on the ImageFolder `train_root` at `size` px, saved to
    `path` as a state_dict: the pretrained backbone both transfer benchmarks start from."""
    import torch
    import torchvision
    from baseline import eval_transform
    from torch import nn
    from torch.utils.data import DataLoader

    data = torchvision.datasets.ImageFolder(str(train_root), eval_transform(size))
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=len(data.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for images, labels in DataLoader(data, batch_size=batch_size, shuffle=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def pretrained(setup: Setup) -> Path:
    """A resnet18 trained on the source tints at 32 px with plain PyTorch, saved as a state_dict (kept for reruns)."""
    path = DATA / f"tints-pretrained-{PRETRAIN_SIZE}px-seed{setup.seed}.pth"
    if path.is_file():
        return path
    root = tinted_imagefolder(
        DATA / f"tints-source-{PRETRAIN_SIZE}px", SOURCE, train=80, val=20, size=64, seed=setup.seed
    )
    return train_backbone(root / "train", path, size=PRETRAIN_SIZE, epochs=3, batch_size=32, seed=setup.seed)


def with_statistics_at(weights: Path, setup: Setup) -> Path:
    """The backbone with BatchNorm statistics of `setup.size`-px images of its own domain (kept for reruns)."""
    import torch
    import torchvision
    from baseline import eval_transform

    from retrain.model.bn_adapt import adapt_bn_stats
    from retrain.model.surgery import BACKBONE

    path = weights.with_name(f"{weights.stem}-stats{setup.size}px.pth")
    if path.is_file():
        return path
    root = tinted_imagefolder(DATA / f"tints-source-{setup.size}px", SOURCE, train=64, val=1, size=setup.size, seed=1)
    model = torchvision.models.resnet18(num_classes=len(SOURCE))
    model.load_state_dict(torch.load(weights, weights_only=True))
    images = torchvision.datasets.ImageFolder(str(root / "train"), eval_transform(setup.size))
    batch = torch.stack([images[i][0] for i in range(len(images))])
    adapt_bn_stats(model, batch.split(32), BACKBONE)
    torch.save(model.state_dict(), path)
    return path


def target_set(setup: Setup, domain: str) -> Path:
    """The new task's ImageFolder, drawn larger than the crop so eval's resize has work to do."""
    name = f"tints-target-{domain}-{setup.per_class}x{setup.size}-seed{setup.seed}"
    size = round(setup.size * 256 / 224)
    val = setup.per_class // 2
    return tinted_imagefolder(DATA / name, TARGET, train=setup.per_class, val=val, size=size, seed=setup.seed + 7)


def run_case(name: str, root: Path, weights: Path, setup: Setup, work: Path, evidence: bool) -> list[Row]:
    """Plain loop, retrain's default and (with `evidence`) the frozen-statistics and fp32-extraction variants."""
    plain = plain_process(root, weights, setup, work)
    # A 20-s process varies by a few seconds on a shared machine: the defaults run `repeats` times, the median counts.
    runs = [retrain_process(root, weights, setup, work / f"{name}-default-{i}") for i in range(setup.repeats)]
    ours = sorted(runs, key=lambda run: run.seconds)[len(runs) // 2]
    cache = ours.results.get("feature_cache") or {}
    adapted = ours.results.get("bn_stats") or {}
    note = (
        f"{plain.seconds / ours.seconds:.1f}x less (median of {', '.join(f'{r.seconds:.1f}' for r in runs)} s); "
        f"bn_stats={adapted.get('setting')} ({adapted.get('images')} images), features in "
        f"{cache.get('extracted_in')} ({cache.get('kernels')})"
    )
    rows = [
        Row(f"{name}: plain loop, wall time", plain.seconds, "s", 1.0),
        Row(f"{name}: retrain defaults, wall time", ours.seconds, "s", ratio(ours.seconds, plain.seconds), note),
        Row(f"{name}: plain loop, val accuracy", f"{100 * plain.accuracy:.1f}%"),
        Row(
            f"{name}: retrain defaults, val accuracy",
            f"{100 * ours.accuracy:.1f}%",
            note=f"{100 * (ours.accuracy - plain.accuracy):+.1f} points",
        ),
    ]
    if evidence:
        for label, override in (
            ("model.bn_stats=frozen", "model.bn_stats=frozen"),
            ("model.feature_cache_precision=fp32", "model.feature_cache_precision=fp32"),
        ):
            variant = retrain_process(root, weights, setup, work / f"{name}-{override.split('.')[-1]}", override)
            rows.append(
                Row(
                    f"{name}: retrain {label}, val accuracy",
                    f"{100 * variant.accuracy:.1f}%",
                    note=f"{100 * (variant.accuracy - ours.accuracy):+.1f} points vs defaults; "
                    f"wall {variant.seconds:.1f} s ({plain.seconds / variant.seconds:.1f}x less than the plain loop)",
                )
            )
    return rows


def add_flags(parser: argparse.ArgumentParser) -> None:
    """This benchmark's flags, next to the shared --quick."""
    parser.add_argument("--per-class", type=int, default=160, help="train images per class (3 classes; val: half)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=max(0, min(8, (os.cpu_count() or 1) - 1)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of retrain's defaults per case (median)")
    parser.add_argument(
        "--data", type=Path, help="an ImageFolder of your own with train/ and val/ folders: one case on it instead"
    )
    parser.add_argument(
        "--weights", type=Path, help="with --data: a resnet18 state_dict to start from (default: tints)"
    )
    parser.add_argument("--plain-loop", help=argparse.SUPPRESS)  # internal: run the plain loop in this process


def main() -> None:
    """Build (or reuse) the images and backbones, time both sides in each case, print the table."""
    args = parse_args(__doc__, extra=add_flags)
    if args.plain_loop:
        print(plain_loop(*json.loads(args.plain_loop)))
        return
    if args.quick:  # checks the script, the numbers mean nothing
        args.per_class, args.image_size, args.epochs, args.repeats = 16, 64, 2, 1
    setup = Setup(args.image_size, args.epochs, args.batch_size, args.workers, args.per_class, args.seed, args.repeats)
    weights = args.weights or pretrained(setup)
    if args.data:  # data not built to show retrain off: the same job on the user's own images
        missing = [str(args.data / split) for split in ("train", "val") if not (args.data / split).is_dir()]
        if missing or not weights.is_file():
            sys.exit(
                f"--data needs train/ and val/ ImageFolder folders and --weights a file; missing: {missing or weights}"
            )
        cases = [(f"your data ({args.data.name})", args.data.resolve(), weights.resolve())]
    else:
        cases = [("shift", target_set(setup, "scan"), weights)]
    if not args.quick and not args.data:
        cases.append(("no shift", target_set(setup, "photo"), with_statistics_at(weights, setup)))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, root, backbone in cases:
            rows += run_case(name, root, backbone, setup, Path(tmp) / name.replace(" ", "-"), not args.quick)
    n_val = setup.per_class // 2
    images = "your images" if args.data else f"{3 * setup.per_class} train + {3 * n_val} val images"
    backbone = (
        f"backbone {args.weights}" if args.weights else f"backbone pretrained at {PRETRAIN_SIZE} px on other tints"
    )
    print_report(
        "Head-only transfer: retrain's defaults vs the plain loop, whole processes",
        rows,
        notes=[
            f"{images} at {setup.size} px, batch {setup.batch_size}, "
            f"{setup.workers} loader worker(s), {setup.epochs} epochs, SGD(fc, lr=0.001, momentum=0.9); {backbone}. "
            "Wall time: process start to exit, imports included.",
        ],
    )


if __name__ == "__main__":
    main()

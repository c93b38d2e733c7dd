"""The plain PyTorch loop a user would write by hand; every other training benchmark compares with it.

    python bench/baseline.py [--quick] [--root DIR] [--steps 5]

ImageFolder, Resize/CenterCrop/ToTensor/Normalize, a DataLoader, resnet18, CrossEntropyLoss, SGD with momentum
and `for inputs, labels in loader`. Nothing from retrain is imported, so nothing of ours can slow it down.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from _machine import Row, parse_args, peak_rss_mib, print_report
from _synthetic import imagefolder
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, models, transforms

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Throughput:
    """Training speed over the timed steps (after warm-up) and the process's peak memory."""

    images_per_s: float
    images: int
    seconds: float
    cpu_seconds: float  # of this process alone: with one thread and no workers, immune to other load
    peak_rss_mib: float
    workers: int
    first_batch_at: float  # time.time() when the first batch left the loader: bench/startup.py's end point


def default_workers(cores: int) -> int:
    """The loader workers a careful user picks: one core stays with the training process (as retrain does)."""
    return max(0, min(8, cores - 1))


def eval_transform(image_size: int) -> transforms.Compose:
    """Resize, CenterCrop, ToTensor, Normalize: the by-hand preprocessing, kept here so other scripts use the same."""
    return transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


def plain_loop(
    root: Path,
    *,
    image_size: int = 224,
    batch_size: int = 32,
    steps: int = 5,
    warmup: int = 1,
    workers: int = 1,
    channels_last: bool = False,
    device: str = "cpu",
    seed: int = 0,
) -> Throughput:
    """Train resnet18 on root/train for warmup + steps batches; time the steps after the warm-up."""
    torch.manual_seed(seed)
    cuda = device.startswith("cuda")
    dataset = datasets.ImageFolder(str(root / "train"), eval_transform(image_size))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=cuda,
    )
    model = models.resnet18(num_classes=len(dataset.classes)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()

    images, start, cpu, step, first_batch_at = 0, time.perf_counter(), time.process_time(), -1, 0.0
    for step, (inputs, labels) in enumerate(loader):
        if step == 0:
            first_batch_at = time.time()
        if step == warmup:  # the clock starts once the first batches (and the lazy allocations) are behind us
            if cuda:
                torch.cuda.synchronize()
            start, cpu, images = time.perf_counter(), time.process_time(), 0
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        outputs = model(inputs)
        loss = criterion(outputs, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        images += len(labels)
        if step + 1 == warmup + steps:
            break
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if step + 1 < warmup + steps:
        raise ValueError(
            f"{root}/train holds {len(dataset)} images; {warmup + steps} batches of {batch_size} need more"
        )
    return Throughput(images / seconds, images, seconds, cpu, peak_rss_mib(), workers, first_batch_at)


def main() -> None:
    """Time the plain loop alone, or for train_throughput.py (--json) in a process of its own."""
    from _machine import cores

    def extra(parser):
        parser.add_argument("--root", type=Path, help="an ImageFolder with train/; default: generate JPEGs")
        parser.add_argument("--image-size", type=int, default=224)
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--steps", type=int, default=5, help="timed steps, after --warmup untimed ones")
        parser.add_argument("--warmup", type=int, default=1)
        parser.add_argument("--workers", type=int, default=default_workers(cores()))
        parser.add_argument("--channels-last", action="store_true")
        parser.add_argument("--device", default="cpu", help="cpu, or cuda for bench/gpu.sh")
        parser.add_argument("--json", type=Path, help="write the figures here instead of printing a table")

    args = parse_args(__doc__, extra)
    if args.quick:
        args.image_size, args.batch_size, args.steps = 32, 8, 2
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            size = (64, 48) if args.quick else (500, 375)
            root = imagefolder(Path(tmp), train=(args.warmup + args.steps) * args.batch_size, val=0, size=size)
        result = plain_loop(
            root,
            image_size=args.image_size,
            batch_size=args.batch_size,
            steps=args.steps,
            warmup=args.warmup,
            workers=args.workers,
            channels_last=args.channels_last,
            device=args.device,
        )
    if args.json:
        args.json.write_text(json.dumps(asdict(result)))
        return
    print_report(
        f"Plain PyTorch loop: resnet18, {args.image_size} px, batch {args.batch_size}",
        [
            Row(
                "plain loop", result.images_per_s, "images/s", 1.0, f"{result.images} images in {result.seconds:.1f} s"
            ),
            Row("peak RSS (training process)", result.peak_rss_mib, "MiB"),
        ],
    )


if __name__ == "__main__":
    main()

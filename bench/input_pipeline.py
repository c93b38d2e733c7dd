"""Images/s of one loader worker: decode + resize + crop + normalize, retrain's pipeline against torchvision's.

    python bench/input_pipeline.py [--quick] [--rounds 5]

The reference is what a user gets from `torchvision.datasets.ImageFolder` (PIL's default loader) with the
eval transforms. Ours is the dataset retrain's DataModule hands its loaders (retrain.data.images.open_rgb,
which lets the JPEG decoder scale down while decoding, then the same transforms), and the same with
data.decode_cache, which keeps big photos' scaled-down decodes on disk for later epochs. The note column shows how
far our pixels are from the reference's, in [0, 1] units. Each figure is the best of --rounds passes, timed by
the process's CPU time with one torch thread, as a DataLoader worker runs: a busy machine cannot inflate it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _machine import Row, parse_args, print_report
from _synthetic import photo, save
from PIL import Image
from torchvision import datasets

from retrain.data.datamodule import ImageFolderDataModule
from retrain.data.splits import DataSplits
from retrain.data.transforms import eval_transforms, preprocessing, train_transforms

AUGMENT = "light"  # the default preset (conf/data/imagefolder.yaml)


def cpu_seconds(load: Callable[[int], object], count: int, rounds: int) -> float:
    """The best CPU time of `rounds` passes over `count` items."""
    return interleaved_cpu_seconds([load], count, rounds)[0]


def interleaved_cpu_seconds(loads: list[Callable[[int], object]], count: int, rounds: int) -> list[float]:
    """The best CPU time of `rounds` passes of each load, taking turns, so a drift of the machine hits all alike."""
    best = [float("inf")] * len(loads)
    for _ in range(rounds):
        for k, load in enumerate(loads):
            start = time.process_time()
            for i in range(count):
                load(i)
            best[k] = min(best[k], time.process_time() - start)
    return best


def pixel_gap(reference: datasets.ImageFolder, ours: torch.utils.data.Dataset) -> str:
    """Mean and max |ours - reference| over every eval output, in [0, 1] pixel units."""
    std = torch.tensor(preprocessing().std).view(3, 1, 1)
    gaps = [((ours[i][0] - reference[i][0]).abs() * std) for i in range(len(reference))]
    mean = sum(float(g.mean()) for g in gaps) / len(gaps)
    return f"pixels vs reference: mean {mean:.4f}, max {max(float(g.max()) for g in gaps):.3f}"


def folder(root: Path, size: tuple[int, int], suffix: str, count: int) -> DataSplits:
    """`count` photos under root/c/ and the one-class split that points both train and val at them."""
    paths = [save(photo(*size, seed=i), root / "c" / f"{i:03d}{suffix}") for i in range(count)]
    samples = [(str(p), 0) for p in paths]
    return DataSplits(root, "split", ["c"], {"train": samples, "val": samples})


def main() -> None:
    """Write each kind of image, time both pipelines on it, print one table."""

    def extra(parser):
        parser.add_argument("--rounds", type=int, default=5, help="passes per pipeline; the best one counts")

    args = parse_args(__doc__, extra)
    torch.set_num_threads(1)  # what a DataLoader worker gets
    phone = (1600, 1200) if args.quick else (4000, 3000)
    kinds = [
        (f"phone photo, {phone[0]}x{phone[1]} JPEG", phone, ".jpg", 2 if args.quick else 4),
        # Small images take ~2-6 ms each: enough of them that a pass is long against the timer's noise.
        ("web photo, 500x375 JPEG", (500, 375), ".jpg", 2 if args.quick else 200),
        ("PNG, 640x480", (640, 480), ".png", 2 if args.quick else 60),
    ]
    rounds = 1 if args.quick else args.rounds
    pre = preprocessing(224)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (kind, size, suffix, count) in enumerate(kinds):
            root = Path(tmp) / str(index)
            splits = folder(root, size, suffix, count)
            megabytes = sum(Path(p).stat().st_size for p, _ in splits.samples["val"]) / count / 1e6
            ours = ImageFolderDataModule(splits, image_size=224, augment=AUGMENT)
            pairs = [("eval", eval_transforms(pre), ours.dataset("val"))]
            if index == 0:  # training pays the decoding too; only big photos leave room to skip work
                pairs.append((f"train, augment={AUGMENT}", train_transforms(pre, AUGMENT), ours.dataset("train")))
            seconds = {}
            for label, transform, dataset in pairs:
                reference = datasets.ImageFolder(str(root), transform)
                ref_s, our_s = interleaved_cpu_seconds([reference.__getitem__, dataset.__getitem__], count, rounds)
                seconds[label] = ref_s
                note = pixel_gap(reference, dataset) if label == "eval" else ""
                rows.append(Row(f"{kind} ({megabytes:.2f} MB), {label}: torchvision", count / ref_s, "images/s", 1.0))
                rows.append(Row(f"{kind}, {label}: retrain", count / our_s, "images/s", ref_s / our_s, note))
            if index == 0:
                rows += cached_rows(kind, splits, Path(tmp) / "decoded", seconds["eval"], count, rounds)
                paths = [p for p, _ in splits.samples["val"]]
                floor_s = cpu_seconds(lambda i, paths=paths: decode_eighth(paths[i]), count, rounds)
                rows.append(
                    Row(
                        f"{kind}: JPEG decoding alone at 1/8 scale",
                        count / floor_s,
                        "images/s",
                        seconds["eval"] / floor_s,
                        "the ceiling for eval: entropy decoding reads every coefficient at any scale",
                    )
                )
    print_report(
        "Input pipeline: decode + resize + crop + normalize, one worker (one thread)",
        rows,
        notes=["Ratios are to torchvision's ImageFolder with the same transforms, on the same files."],
    )


def cached_rows(
    kind: str, splits: DataSplits, cache_dir: Path, reference_s: float, count: int, rounds: int
) -> list[Row]:
    """Eval with data.decode_cache: the first epoch writes the scaled-down decodes, later ones read them back."""
    uncached = ImageFolderDataModule(splits, image_size=224, augment=AUGMENT).dataset("val")
    cached = ImageFolderDataModule(splits, image_size=224, augment=AUGMENT, decode_cache=str(cache_dir)).dataset("val")
    first_s = cpu_seconds(cached.__getitem__, count, 1)
    later_s = cpu_seconds(cached.__getitem__, count, rounds)
    same = all(torch.equal(cached[i][0], uncached[i][0]) for i in range(count))
    megabytes = sum(p.stat().st_size for p in cache_dir.rglob("*.npy")) / count / 1e6
    note = f"{megabytes:.2f} MB per image on disk; pixels {'identical to' if same else 'DIFFERENT from'} uncached"
    return [
        Row(
            f"{kind}, eval: retrain, data.decode_cache, first epoch", count / first_s, "images/s", reference_s / first_s
        ),
        Row(
            f"{kind}, eval: retrain, data.decode_cache, later epochs",
            count / later_s,
            "images/s",
            reference_s / later_s,
            note,
        ),
    ]


def decode_eighth(path: str) -> None:
    """Only what no PIL pipeline can skip: decode the JPEG at its smallest scale."""
    with Image.open(path) as img:
        img.draft("RGB", (img.width // 8, img.height // 8))
        img.load()


if __name__ == "__main__":
    main()

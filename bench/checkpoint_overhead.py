"""What rolling checkpoints inside an epoch cost: `callbacks.checkpoint.every_n_minutes` and `every_n_steps`.

    python bench/checkpoint_overhead.py [--quick] [--steps 20] [--every 5]

Full fine-tuning of resnet18, 224 px, batch 32, as bench/train_throughput.py runs it (`python train.py` with the
timing callback of bench/_probe.py, one process per row). Rows: the plain PyTorch loop (the baseline); retrain
with no rolling checkpoint (every_n_minutes=null); retrain's default (every_n_minutes=30, which in a run this short
only checks the clock each step); and retrain rewriting last.ckpt every `--every` steps. The cost of one save (an
atomic write of weights, optimizer state and the loader's state) is measured inside that last run: the pause after
the batches that end with a save, less the pause after the others; that cost over 30 minutes is what the default
adds to an epoch. Whole rows, separate processes on a shared machine, differ by more than a few saves.
--quick: 32 px, batch 8, a save every step, and no default row (numbers meaningless).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _machine import Row, parse_args, print_report, ratio
from _synthetic import imagefolder
from train_throughput import plain, retrain

NO_ROLLING = ("callbacks.checkpoint.every_n_minutes=null",)
DEFAULT_MINUTES = 30


def saves_in_window(warmup: int, steps: int, every: int) -> int:
    """Rolling saves inside the timed batches: after batch b when (b + 1) % every == 0, never after an epoch's last."""
    last = warmup + steps - 1
    return sum(1 for b in range(warmup, last) if (b + 1) % every == 0)


def save_seconds(gaps: dict[str, float], every: int) -> float:
    """One rolling save, measured inside one run: the mean pause after the batches that end with a save, less the
    mean pause after the others (the next batch's loading). Rows in separate processes differ by more than a save's
    cost on a shared machine, so their throughputs alone cannot show it."""
    after_save = [s for b, s in gaps.items() if (int(b) + 1) % every == 0]
    others = [s for b, s in gaps.items() if (int(b) + 1) % every != 0]
    if not after_save:
        return float("nan")
    baseline = sum(others) / len(others) if others else 0.0
    return max(0.0, sum(after_save) / len(after_save) - baseline)


def main() -> None:
    """Generate the data, run the rows, print one table."""

    def extra(parser):
        parser.add_argument("--image-size", type=int, default=224)
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
        parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
        parser.add_argument("--every", type=int, default=5, help="every_n_steps of the last row")

    args = parse_args(__doc__, extra)
    size, batch, steps, warmup, every = args.image_size, args.batch_size, args.steps, args.warmup, args.every
    photo_size = (500, 375)
    if args.quick:
        size, batch, steps, every, photo_size = 32, 8, 3, 1, (64, 48)
    rolling = (*NO_ROLLING, f"callbacks.checkpoint.every_n_steps={every}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = imagefolder(work / "photos", train=(warmup + steps) * batch, size=photo_size)
        base = plain(root, work, size, batch, steps, warmup)
        none = retrain(root, work, size, batch, steps, warmup, NO_ROLLING)
        default = None if args.quick else retrain(root, work, size, batch, steps, warmup, ())
        saving = retrain(root, work, size, batch, steps, warmup, rolling)
        checkpoint = next((work / "logs").rglob("last.ckpt"), None)
        megabytes = checkpoint.stat().st_size / 2**20 if checkpoint else float("nan")

    saves = saves_in_window(warmup, steps, every)
    per_save = save_seconds(saving["gaps"], every)
    step_s = none["seconds"] / steps
    rate = base["images_per_s"]
    rows = [
        Row("plain PyTorch loop", rate, "images/s", 1.0),
        Row("retrain, no rolling checkpoint", none["images_per_s"], "images/s", ratio(none["images_per_s"], rate)),
    ]
    if default is not None:
        rows.append(
            Row(
                f"retrain, default (every_n_minutes={DEFAULT_MINUTES}: clock checked each step)",
                default["images_per_s"],
                "images/s",
                ratio(default["images_per_s"], rate),
                f"{100 * (none['images_per_s'] / default['images_per_s'] - 1):+.2f}% time vs no rolling checkpoint",
            )
        )
    rows += [
        Row(
            f"retrain, every_n_steps={every}",
            saving["images_per_s"],
            "images/s",
            ratio(saving["images_per_s"], rate),
            f"{saves} saves of {megabytes:.0f} MB in {steps} steps",
        ),
        Row("one rolling save (atomic last.ckpt)", per_save, "s", None, f"{per_save / step_s:.1f} training steps"),
        Row(
            f"added to training time at the default (one save per {DEFAULT_MINUTES} min)",
            f"{100 * per_save / (60 * DEFAULT_MINUTES):.3f}%",
            "",
            None,
            f"every_n_steps={every}: {100 * per_save / (every * step_s):.1f}%",
        ),
    ]
    print_report(
        f"Rolling checkpoints: resnet18, full fine-tuning, {size} px, batch {batch}",
        rows,
        notes=[f"Timed: {steps} steps after {warmup} warm-up step(s), on {photo_size[0]}x{photo_size[1]} JPEGs."],
    )


if __name__ == "__main__":
    main()

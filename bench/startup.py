"""Time to the first training batch: from process start, `python train.py` against the plain PyTorch loop.

    python bench/startup.py [--quick] [--repeats 2]

Each row is a fresh process timed from launch to the moment its first training batch leaves the loader (the
plain loop's `for` loop, retrain's first `on_train_batch_start`): imports, config composition, the data scan
and checks, the model, the Trainer, the loader's first batch. retrain runs its defaults on 600 generated
500x375 JPEGs (full fine-tuning, and `model.freeze=true`, whose first batch comes after the BatchNorm
adaptation and the feature extraction); the plain loop is bench/baseline.py on the same folder. Rows run
interleaved, `--repeats` times each; the table shows their mean. The import rows are separate processes that only
import; retrain's own split is when its Trainer's callbacks were built (after imports, config, data scan and
model) against its first batch. --quick: 64 px images, one repeat.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _machine import Row, parse_args, print_report, ratio
from _synthetic import imagefolder
from train_throughput import plain, retrain

IMPORTS = {
    "torch + torchvision (what the plain loop imports)": "import torch, torchvision",
    "lightning (torchmetrics, and through it scipy.signal)": "import lightning",
    "retrain's train task (lightning, hydra and ours)": "import retrain.tasks.train",
}


def timed_start(run: Callable[..., dict], *args: object) -> tuple[float, float]:
    """Launch `run` (train_throughput's plain or retrain): seconds until its first batch, and until its Trainer's
    callbacks were built (retrain only; 0 for the plain loop)."""
    launched = time.time()
    figures = run(*args)
    made = figures.get("made_at", launched) - launched
    return figures["first_batch_at"] - launched, made


def import_seconds(statement: str) -> float:
    """Seconds from launching a fresh interpreter until `statement` has run in it (its exit not counted)."""
    launched = time.time()
    done = subprocess.run(
        [sys.executable, "-c", f"{statement}; import time; print(time.time())"], check=True, capture_output=True
    )
    return float(done.stdout.split()[-1]) - launched


def main() -> None:
    """Generate the data, time the rows, print one table."""

    def extra(parser):
        parser.add_argument("--repeats", type=int, default=2, choices=range(1, 11), help="runs of each row, 1-10")

    args = parse_args(__doc__, extra)
    size, batch, repeats, photo = 224, 32, args.repeats, (500, 375)
    if args.quick:
        size, batch, repeats, photo = 32, 8, 1, (64, 48)
    short = (2, 1)  # steps, warmup: the run only has to reach its first batch
    rows_of: dict[str, list[tuple[float, float]]] = {"plain": [], "full": [], "frozen": []}
    imports: dict[str, list[float]] = {name: [] for name in IMPORTS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = imagefolder(work / "photos", train=480, val=120, size=photo)
        for _ in range(repeats):
            rows_of["plain"].append(timed_start(plain, root, work, size, batch, *short))
            rows_of["full"].append(timed_start(retrain, root, work, size, batch, *short, ()))
            frozen = ("model.freeze=true", "data.augment=none")  # head-only, feature cache on (its auto conditions)
            rows_of["frozen"].append(timed_start(retrain, root, work, size, batch, *short, frozen))
            for name, statement in IMPORTS.items():
                imports[name].append(import_seconds(statement))

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    def first(name: str) -> float:
        return mean([first_batch for first_batch, _ in rows_of[name]])

    def made(name: str) -> float:
        return mean([built for _, built in rows_of[name]])

    base = first("plain")
    rows = [
        Row("plain PyTorch loop: start to first batch", base, "s", 1.0),
        Row("retrain defaults, full fine-tuning: start to first batch", first("full"), "s", ratio(first("full"), base)),
        Row(
            "  of which: start to the Trainer's callbacks",
            made("full"),
            "s",
            ratio(made("full"), base),
            "imports, config, data scan and checks, model",
        ),
        Row(
            "retrain model.freeze=true: start to first head batch",
            first("frozen"),
            "s",
            ratio(first("frozen"), base),
            f"BatchNorm adaptation and feature extraction after the callbacks ({made('frozen'):.1f} s)",
        ),
        *(Row(f"import {name}", mean(values), "s", ratio(mean(values), base)) for name, values in imports.items()),
    ]
    print_report(
        f"Time to the first training batch: resnet18, {size} px, batch {batch}, 480 train + 120 val JPEGs",
        rows,
        [f"Mean of {repeats} interleaved run(s) per row; each row a fresh process."],
    )


if __name__ == "__main__":
    main()

"""Training images/s of retrain's default config against the plain PyTorch loop, and what channels_last and bf16 do.

    python bench/train_throughput.py [--quick] [--steps 5] [--overhead-steps 20]

Full fine-tuning of resnet18 (nothing frozen), 224 px, batch 32, on a generated ImageFolder of 500x375 JPEGs.
Our rows run `python train.py data.root=...` exactly as a user does, plus a timing callback (bench/_probe.py) and
overrides that only shorten the run (one epoch of warm-up + timed batches, one validation batch, no test or
publishing). Every row runs in a process of its own, so peak RSS is per configuration. The plain loop runs
first and last; the ratios use the mean of both, and the spread between them shows the noise of the machine.
The 64 px rows make fixed per-step costs (logging, metrics, progress bar) visible, because the model's
share of each step shrinks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _machine import Row, cores, parse_args, print_report
from _synthetic import imagefolder
from baseline import default_workers

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CONFIGS = [
    ("retrain, default config", ()),
    ("retrain, model.channels_last=true", ("model.channels_last=true",)),
    ("retrain, trainer.precision=bf16-mixed", ("trainer.precision=bf16-mixed",)),
]


def _run(cmd: list[str], cwd: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)}\nfailed with exit code {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")


def plain(root: Path, work: Path, size: int, batch: int, steps: int, warmup: int) -> dict:
    """baseline.plain_loop in a fresh process."""
    out = work / f"plain-{size}-{len(list(work.glob('plain-*')))}.json"
    cmd = [sys.executable, str(BENCH / "baseline.py"), "--root", str(root), "--image-size", str(size)]
    cmd += ["--batch-size", str(batch), "--steps", str(steps), "--warmup", str(warmup), "--json", str(out)]
    cmd += ["--workers", str(default_workers(cores()))]
    _run(cmd, work)
    return json.loads(out.read_text())


def retrain(root: Path, work: Path, size: int, batch: int, steps: int, warmup: int, overrides: tuple[str, ...]) -> dict:
    """`python train.py` with the project's config plus `overrides`, timed by the probe callback."""
    out = work / f"retrain-{len(list(work.glob('retrain-*')))}.json"
    cmd = [sys.executable, str(REPO / "train.py"), f"data.root={root}", f"data.image_size={size}"]
    cmd += [f"data.batch_size={batch}", "trainer.max_epochs=1", f"trainer.limit_train_batches={warmup + steps}"]
    # Only the length of the run changes: one validation batch, no sanity check, no test, no registry version.
    cmd += ["trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "test=false", "save.publish=false"]
    cmd += ["extras.print_config=false", "+callbacks.probe._target_=_probe.ThroughputProbe"]
    cmd += [f"+callbacks.probe.out={out}", f"+callbacks.probe.warmup={warmup}", *overrides]
    _run(cmd, work)
    return json.loads(out.read_text())


def _note(figures: dict) -> str:
    return (
        f"peak RSS {figures['peak_rss_mib']:,.0f} MiB; {figures['workers']} loader worker(s); "
        f"{figures['images']} images in {figures['seconds']:.1f} s"
    )


def main() -> None:
    """Generate the data, run every configuration once (the plain loop twice), print one table."""

    def extra(parser):
        parser.add_argument("--image-size", type=int, default=224)
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
        parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
        parser.add_argument("--overhead-steps", type=int, default=20, help="timed steps of the 64 px rows; 0: skip")

    args = parse_args(__doc__, extra)
    size, batch, steps, warmup = args.image_size, args.batch_size, args.steps, args.warmup
    photo_size = (500, 375)
    if args.quick:
        size, batch, steps, photo_size, args.overhead_steps = 32, 8, 2, (64, 48), 0
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = imagefolder(work / "photos", train=(warmup + steps) * batch, size=photo_size)
        first = plain(root, work, size, batch, steps, warmup)
        ours = [(label, retrain(root, work, size, batch, steps, warmup, extra)) for label, extra in CONFIGS]
        runs = [first] if args.quick else [first, plain(root, work, size, batch, steps, warmup)]
        base = sum(run["images_per_s"] for run in runs) / len(runs)
        for i, run in enumerate(runs, 1):
            rows.append(
                Row(
                    f"plain PyTorch loop, run {i}",
                    run["images_per_s"],
                    "images/s",
                    run["images_per_s"] / base,
                    _note(run),
                )
            )
        rows += [
            Row(label, fig["images_per_s"], "images/s", fig["images_per_s"] / base, _note(fig)) for label, fig in ours
        ]

        if args.overhead_steps:
            small = imagefolder(work / "small", train=(warmup + args.overhead_steps) * batch, size=(96, 72))
            plain64 = plain(small, work, 64, batch, args.overhead_steps, warmup)
            ours64 = retrain(small, work, 64, batch, args.overhead_steps, warmup, ())
            rows.append(Row("plain PyTorch loop, 64 px", plain64["images_per_s"], "images/s", 1.0, _note(plain64)))
            rows.append(
                Row(
                    "retrain, default config, 64 px",
                    ours64["images_per_s"],
                    "images/s",
                    ours64["images_per_s"] / plain64["images_per_s"],
                    _note(ours64),
                )
            )
    print_report(
        f"Training throughput: resnet18, full fine-tuning, {size} px, batch {batch}",
        rows,
        notes=[
            f"Timed: {steps} steps after {warmup} warm-up step(s), on {photo_size[0]}x{photo_size[1]} JPEGs. "
            "The 64 px rows (96x72 JPEGs) compare with their own plain loop."
        ],
    )


if __name__ == "__main__":
    main()

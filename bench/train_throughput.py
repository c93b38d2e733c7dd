"""Training images/s of retrain's default config against the plain PyTorch loop, and what channels_last and bf16 do.

    python bench/train_throughput.py [--quick] [--cpu-time] [--steps 5] [--overhead-steps 20]

Full fine-tuning of resnet18 (nothing frozen), 224 px, batch 32, on a generated ImageFolder of 500x375 JPEGs.
Our rows run `python train.py data.root=...` exactly as a user does, plus a timing callback (bench/_probe.py) and
overrides that only shorten the run (one epoch of warm-up + timed batches, one validation batch, no test or
publishing). Every run is a process of its own, so peak RSS is per configuration. The plain loop and the default
config run twice, interleaved with the others; their rows show the mean and, in the note, both runs: the
spread is the noise of the machine. The 64 px rows make fixed per-step costs (logging, metrics, progress bar)
visible, because the model's share of each step shrinks. --cpu-time runs every row as those: a fair ratio on
a shared machine, where other jobs stretch wall-clock times unevenly. --quick runs the plain loop and the
default config once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from _machine import Row, cores, parse_args, print_report
from _synthetic import imagefolder
from baseline import default_workers

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CONFIGS = [
    ("retrain, default config (channels_last=auto: on at 224 px on a CPU)", ()),
    ("retrain, model.channels_last=false (NCHW, as the plain loop)", ("model.channels_last=false",)),
    ("retrain, trainer.precision=bf16-mixed (on top of the default)", ("trainer.precision=bf16-mixed",)),
]


def _run(cmd: list[str], cwd: Path, threads: int | None = None) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")]))  # for _probe
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)}\nfailed with exit code {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")


def plain(
    root: Path, work: Path, size: int, batch: int, steps: int, warmup: int, *extra: str, threads: int | None = None
) -> dict:
    """baseline.plain_loop in a fresh process; `extra` are more baseline.py flags (e.g. --device cuda)."""
    out = work / f"plain-{size}-{len(list(work.glob('plain-*')))}.json"
    cmd = [sys.executable, str(BENCH / "baseline.py"), "--root", str(root), "--image-size", str(size)]
    cmd += ["--batch-size", str(batch), "--steps", str(steps), "--warmup", str(warmup), "--json", str(out)]
    cmd += ["--workers", str(default_workers(cores())), *extra]
    _run(cmd, work, threads)
    return json.loads(out.read_text())


def retrain(
    root: Path,
    work: Path,
    size: int,
    batch: int,
    steps: int,
    warmup: int,
    overrides: tuple[str, ...],
    threads: int | None = None,
) -> dict:
    """`python train.py` with the project's config plus `overrides`, timed by the probe callback."""
    out = work / f"retrain-{len(list(work.glob('retrain-*')))}.json"
    cmd = [sys.executable, str(REPO / "train.py"), f"data.root={root}", f"data.image_size={size}"]
    cmd += [f"data.batch_size={batch}", "trainer.max_epochs=1", f"trainer.limit_train_batches={warmup + steps}"]
    # Only the length of the run changes: one validation batch, no sanity check, no test, no registry version.
    cmd += ["trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "test=false", "save.publish=false"]
    cmd += ["extras.print_config=false", "+callbacks.probe._target_=_probe.ThroughputProbe"]
    cmd += [f"+callbacks.probe.out={out}", f"+callbacks.probe.warmup={warmup}", *overrides]
    _run(cmd, work, threads)
    return json.loads(out.read_text())


def main() -> None:
    """Generate the data, run the configurations interleaved, print one table."""

    def extra(parser):
        parser.add_argument("--image-size", type=int, default=224)
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
        parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
        parser.add_argument("--overhead-steps", type=int, default=20, help="timed steps of the 64 px rows; 0: skip")
        parser.add_argument(
            "--cpu-time",
            action="store_true",
            help="every row with one thread, no loader workers, timed by CPU time: ratios a busy machine cannot skew",
        )

    args = parse_args(__doc__, extra)
    size, batch, steps, warmup = args.image_size, args.batch_size, args.steps, args.warmup
    photo_size = (500, 375)
    if args.quick:
        size, batch, steps, photo_size, args.overhead_steps = 32, 8, 2, (64, 48), 0
    cpu_mode = Mode(cpu_time=True)
    mode = cpu_mode if args.cpu_time else Mode(cpu_time=False)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = imagefolder(work / "photos", train=(warmup + steps) * batch, size=photo_size)
        ours: dict[str, list[dict]] = {label: [] for label, _ in CONFIGS}
        plains = []
        # Interleaved: plain, default, channels_last, bf16, then plain and default again, so a change in the
        # machine's load hits both sides of the key ratio. --quick runs the plain loop and the default once.
        plan = [None, *CONFIGS, None, CONFIGS[0]] if not args.quick else [None, CONFIGS[0]]
        for config in plan:
            if config is None:
                plains.append(plain(root, work, size, batch, steps, warmup, *mode.plain, threads=mode.threads))
            else:
                overrides = (*config[1], *mode.ours)
                ours[config[0]].append(retrain(root, work, size, batch, steps, warmup, overrides, mode.threads))
        base = mode.mean(plains)
        rows.append(Row("plain PyTorch loop", base, mode.unit, 1.0, mode.note(plains)))
        for label, figs in ours.items():
            if figs:
                rows.append(Row(label, mode.mean(figs), mode.unit, mode.mean(figs) / base, mode.note(figs)))

        if args.overhead_steps:
            # Always in CPU time: it counts every cost of a step, ours included, and other processes cannot
            # inflate it. Each side runs twice, interleaved, and its best run counts: CPU time still varies with
            # what shares the caches, and a fixed amount of work can only be slowed down by that.
            small = imagefolder(work / "small", train=(warmup + args.overhead_steps) * batch, size=(96, 72))
            n = args.overhead_steps
            plain64: list[dict] = []
            ours64: list[dict] = []
            for _ in range(2):
                plain64.append(plain(small, work, 64, batch, n, warmup, *cpu_mode.plain, threads=1))
                ours64.append(retrain(small, work, 64, batch, n, warmup, cpu_mode.ours, threads=1))
            best = {name: max(cpu_mode.rate(f) for f in figs) for name, figs in (("plain", plain64), ("ours", ours64))}
            ms = {name: 1000 * batch / rate for name, rate in best.items()}
            rows.append(
                Row(
                    "plain PyTorch loop, 64 px, 1 thread",
                    best["plain"],
                    cpu_mode.unit,
                    1.0,
                    f"best of {cpu_mode.runs(plain64)}: {ms['plain']:.0f} ms of CPU per step",
                )
            )
            rows.append(
                Row(
                    "retrain, default config, 64 px, 1 thread",
                    best["ours"],
                    cpu_mode.unit,
                    best["ours"] / best["plain"],
                    f"best of {cpu_mode.runs(ours64)}: {ms['ours']:.0f} ms per step, "
                    f"{ms['ours'] - ms['plain']:+.1f} ms for Lightning, our callbacks and augmentation",
                )
            )
    how = (
        "one torch thread, batches loaded in the training process, timed by its CPU time"
        if args.cpu_time
        else f"{cores()} cores, retrain's default loader workers, wall-clock"
    )
    print_report(
        f"Training throughput: resnet18, full fine-tuning, {size} px, batch {batch}",
        rows,
        notes=[
            f"Timed: {steps} steps after {warmup} warm-up step(s), on {photo_size[0]}x{photo_size[1]} JPEGs; {how}."
            + (
                " The 64 px rows (96x72 JPEGs, one torch thread, no loader workers) time CPU seconds of the"
                " training process, so they show our per-step cost even on a busy machine."
                if args.overhead_steps
                else ""
            )
        ],
    )


@dataclass
class Mode:
    """How the rows are run and read: wall-clock with the defaults, or CPU time of one thread."""

    cpu_time: bool

    @property
    def threads(self) -> int | None:
        return 1 if self.cpu_time else None

    @property
    def plain(self) -> tuple[str, ...]:
        return ("--workers", "0") if self.cpu_time else ()

    @property
    def ours(self) -> tuple[str, ...]:
        return ("data.num_workers=0",) if self.cpu_time else ()

    @property
    def unit(self) -> str:
        return "images per CPU-second" if self.cpu_time else "images/s"

    def rate(self, fig: dict) -> float:
        return fig["images"] / fig["cpu_seconds"] if self.cpu_time else fig["images_per_s"]

    def mean(self, figs: list[dict]) -> float:
        return sum(self.rate(f) for f in figs) / len(figs)

    def runs(self, figs: list[dict]) -> str:
        return " and ".join(f"{self.rate(f):.3g}" for f in figs)

    def note(self, figs: list[dict]) -> str:
        last = figs[-1]
        return (
            f"{'runs: ' + self.runs(figs) + '; ' if len(figs) > 1 else ''}peak RSS {last['peak_rss_mib']:,.0f} MiB; "
            f"{last['workers']} loader worker(s); {last['images']} images in {last['seconds']:.1f} s"
        )


if __name__ == "__main__":
    main()

"""What bench/gpu.sh runs: ResNet18 training images/s on one CUDA GPU, model-bound and end to end, in one table.

Model-bound: a plain loop on one synthetic batch that stays on the GPU, so neither decoding nor the host
limits it. End to end: generated 500x375 JPEGs through the loader workers, the plain loop (baseline.py) and
`python train.py trainer=gpu` (timed by bench/_probe.py), for fp32, bf16-mixed and channels_last + bf16 +
compile. --allow-cpu runs the same code on the CPU at toy sizes, only to check the script itself.
"""

from __future__ import annotations

import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from _machine import Row, cores, parse_args, print_report
from _synthetic import photo, save
from torch.nn import functional as F
from torchvision.models import resnet18
from train_throughput import plain, retrain

CONFIGS = {  # name: (bf16, channels_last + compile)
    "fp32": (False, False),
    "bf16-mixed": (True, False),
    "channels_last + bf16-mixed + compile": (True, True),
}
OVERRIDES = {
    "fp32": ("trainer=gpu", "model.channels_last=false"),
    "bf16-mixed": ("trainer=gpu", "trainer.precision=bf16-mixed", "model.channels_last=false"),
    "channels_last + bf16-mixed + compile": (
        "trainer=gpu",
        "trainer.precision=bf16-mixed",
        "model.channels_last=true",
        "model.compile=true",
    ),
}


def model_bound(config: str, *, batch: int, size: int, steps: int, warmup: int, device: str, backend: str) -> float:
    """Images/s of SGD steps on one batch resident on the device; nothing but the model and optimizer runs."""
    bf16, fused = CONFIGS[config]
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # what a user tuning for speed sets; Lightning leaves it off
    fmt = torch.channels_last if fused else torch.contiguous_format
    model = resnet18(num_classes=1000).to(device, memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,), device=device)
    if fused:
        model.compile(backend=backend)

    def step() -> None:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):  # compiles, tunes cuDNN and allocates
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _write(job: tuple[Path, int]) -> None:
    path, seed = job
    save(photo(500, 375, seed=seed), path)


def jpeg_folder(root: Path, count: int) -> Path:
    """root/{train,val}/<class>/*.jpg with `count` train images, written by every core at once."""
    jobs = [(root / "train" / f"class{i % 10}" / f"{i:06d}.jpg", i) for i in range(count)]
    jobs += [(root / "val" / f"class{i}" / "0.jpg", count + i) for i in range(10)]
    with ProcessPoolExecutor(max_workers=cores()) as pool:
        list(pool.map(_write, jobs, chunksize=64))
    return root


def main() -> None:
    """Check for CUDA, then run the model-bound and end-to-end figures and print one table."""

    def extra(parser):
        parser.add_argument("--batch-size", type=int, default=256)
        parser.add_argument("--image-size", type=int, default=224)
        parser.add_argument("--steps", type=int, default=50, help="timed model-bound steps")
        parser.add_argument("--e2e-steps", type=int, default=20, help="timed end-to-end steps")
        parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
        parser.add_argument("--skip-e2e", action="store_true", help="model-bound figures only")
        parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU at toy sizes: checks the script")

    args = parse_args(__doc__, extra)
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit(
            "bench/gpu.sh needs a CUDA GPU, and torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on a machine with an NVIDIA GPU "
            "and a CUDA build of torch; for CPU figures use `make bench`."
        )
    device, backend = ("cuda", "inductor") if torch.cuda.is_available() else ("cpu", "eager")
    if args.quick or device == "cpu":
        args.batch_size, args.image_size, args.steps, args.e2e_steps, args.warmup = 8, 64, 2, 2, 1
    size, batch, warmup = args.image_size, args.batch_size, args.warmup
    bound = {
        name: model_bound(name, batch=batch, size=size, steps=args.steps, warmup=warmup, device=device, backend=backend)
        for name in CONFIGS
    }
    rows = [
        Row(f"model-bound (synthetic batch on the device), plain loop, {name}", ips, "images/s", ips / bound["fp32"])
        for name, ips in bound.items()
    ]
    if not args.skip_e2e:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            root = jpeg_folder(work / "photos", (warmup + args.e2e_steps) * batch)
            steps, workers = args.e2e_steps, max(1, cores() - 1)
            base = plain(root, work, size, batch, steps, warmup, "--device", device, "--workers", str(workers))
            rows.append(Row("end to end (JPEGs), plain loop, fp32", base["images_per_s"], "images/s", 1.0, _note(base)))
            for name, overrides in OVERRIDES.items():
                if device == "cpu":  # the CPU check: same code path, no GPU preset, no inductor build
                    overrides = tuple(o for o in overrides if o not in ("trainer=gpu", "model.compile=true"))
                fig = retrain(root, work, size, batch, steps, warmup, (*overrides, f"data.num_workers={workers}"))
                note = f"{_note(fig)}; {fig['images_per_s'] / bound[name]:.0%} of model-bound"
                rows.append(
                    Row(
                        f"end to end (JPEGs), retrain, {name}", fig["images_per_s"], "images/s", _ratio(fig, base), note
                    )
                )
    where = torch.cuda.get_device_name(0) if device == "cuda" else "the CPU (--allow-cpu: a check of the script only)"
    print_report(
        f"Training throughput on {where}: resnet18, {size} px, batch {batch}",
        rows,
        notes=[
            "Model-bound ratios are to model-bound fp32; end-to-end ratios to the end-to-end plain loop (fp32). "
            "End to end, both use cores - 1 loader workers (retrain's default stops at 8), since decoding JPEGs "
            "is what limits a fast GPU."
        ],
    )


def _ratio(fig: dict, base: dict) -> float:
    return fig["images_per_s"] / base["images_per_s"]


def _note(fig: dict) -> str:
    return f"{fig['workers']} loader workers, peak RSS {fig['peak_rss_mib']:,.0f} MiB"


if __name__ == "__main__":
    main()

"""Inference speed of resnet18 in eager mode, torch.compile, TorchScript and ONNX Runtime, as ratios to eager.

    python bench/inference.py [--quick] [--image-size 224] [--calls 40]

Batch-1 latency (median of --calls calls; lower is better) and batch-32 throughput (higher is better), fp32,
on the CPU threads torch uses (ONNX Runtime gets the same number). TorchScript and ONNX files are written by
retrain.export, the code behind `export.py`, so the figures are those of the files users deploy.
--quick compiles with backend="eager" (graph capture without code generation): a cold inductor compile takes
minutes on a 2-core CI machine, and --quick only checks that the script still runs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _machine import Row, parse_args, print_report
from torchvision import models

from retrain.export.onnx import export_onnx, onnx_session, run_onnx
from retrain.export.torchscript import export_torchscript

Predict = Callable[[torch.Tensor], torch.Tensor]
ONNX_OPSET = 23  # what conf/export.yaml exports


def timed_calls(predict: Predict, images: torch.Tensor, calls: int, clock: Callable[[], float]) -> list[float]:
    """Seconds of each of `calls` calls, by `clock` (wall time, or this process's CPU time)."""
    times = []
    for _ in range(calls):
        start = clock()
        predict(images)
        times.append(clock() - start)
    return times


def runtimes(model: torch.nn.Module, example: torch.Tensor, folder: Path, quick: bool) -> dict[str, Predict]:
    """One predict function per way of running the model; exports and compiles happen here, untimed."""

    def no_grad(module: Callable[[torch.Tensor], torch.Tensor]) -> Predict:
        def predict(images: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return module(images)

        return predict

    compiled = torch.compile(model, backend="eager" if quick else "inductor")
    scripted = torch.jit.load(export_torchscript(model, example, folder / "model.ts", {}))
    session = onnx_session(export_onnx(model, example, folder / "model.onnx", {}, opset=ONNX_OPSET))
    return {
        "eager": no_grad(model),
        "torch.compile" + (" (backend=eager)" if quick else ""): no_grad(compiled),
        "TorchScript (traced, frozen)": no_grad(scripted),
        "ONNX Runtime": lambda images: run_onnx(session, images),
    }


def main() -> None:
    """Export and compile once, check every runtime agrees with eager, then time batch 1 and batch 32."""

    def extra(parser):
        parser.add_argument("--image-size", type=int, default=224)
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--calls", type=int, default=40, help="batch-1 calls per runtime")
        parser.add_argument("--batch-calls", type=int, default=8, help="batch calls per runtime")
        parser.add_argument("--rounds", type=int, default=4, help="the calls are split into rounds, interleaved")
        parser.add_argument("--threads", type=int, help="torch and ONNX Runtime threads (default: torch's choice)")
        parser.add_argument(
            "--cpu-time",
            action="store_true",
            help="time by this process's CPU time: with --threads 1, other load on the machine cannot inflate it",
        )

    args = parse_args(__doc__, extra)
    if args.quick:
        args.image_size, args.batch_size, args.calls, args.batch_calls, args.rounds = 64, 4, 3, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.manual_seed(0)
    model = models.resnet18(num_classes=10).eval()
    size = args.image_size
    one, batch = torch.randn(1, 3, size, size), torch.randn(args.batch_size, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        predicts = runtimes(model, torch.randn(2, 3, size, size), Path(tmp), args.quick)
        reference = predicts["eager"](batch)
        for name, predict in predicts.items():
            # Warm-up: first calls compile, allocate and tune; also a check that the runtime is the same model.
            for images in (one, one, batch):
                out = predict(images)
            torch.testing.assert_close(out, reference, atol=1e-3, rtol=1e-3, msg=f"{name} disagrees with eager")
        # Rounds that visit every runtime in turn, so a change in the machine's load hits them all alike.
        single: dict[str, list[float]] = {name: [] for name in predicts}
        batched: dict[str, list[float]] = {name: [] for name in predicts}
        for _ in range(args.rounds):
            for name, predict in predicts.items():
                single[name] += timed_calls(predict, one, max(1, args.calls // args.rounds), clock)
                batched[name] += timed_calls(predict, batch, max(1, args.batch_calls // args.rounds), clock)
    # Latency: the median call, which ignores the odd call another process interrupts. Throughput: all calls.
    figures = {
        name: (1000 * statistics.median(single[name]), len(batched[name]) * len(batch) / sum(batched[name]))
        for name in predicts
    }
    eager_ms, eager_ips = figures["eager"]
    rows = []
    for name, (ms, _) in figures.items():
        rows.append(Row(f"{name}: batch-1 latency", ms, "ms", ms / eager_ms, "lower is better"))
    for name, (_, ips) in figures.items():
        rows.append(Row(f"{name}: batch-{args.batch_size} throughput", ips, "images/s", ips / eager_ips))
    print_report(
        f"Inference: resnet18, {size} px, fp32, {torch.get_num_threads()} thread(s)",
        rows,
        notes=[
            "Ratios are to eager PyTorch (torch.inference_mode) measured in the same run; times are "
            + ("CPU time of this process." if args.cpu_time else "wall-clock.")
        ],
    )


if __name__ == "__main__":
    main()

"""Measure every format the way it will run: val accuracy, agreement with float, CPU latency and throughput.

Decisions:
- Accuracy and agreement go through each format's own runtime on the same real validation batches, so a
  difference in preprocessing or numerics shows up as a number, not as a surprise in production.
- Timings use random inputs of the model's input size, after warm-up runs. The formats take turns run by
  run and each reports its median run, so load from other processes on a shared machine skews the ratios
  as little as possible. All formats use torch's CPU thread count (onnxruntime is set to the same).
- A missed target is reported, never hidden: the report says what was measured and whether it met the target.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retrain.errors import DataError
from retrain.inference.deploy_info import DeployInfo
from retrain.inference.runtimes import Runtime, eager_runtime, load_runtime

REFERENCE = "eager"
REPORT_FILE = "export_report.json"
INT8_ACCURACY_CHECK = "int8 val accuracy drop vs float (points)"


@dataclass(frozen=True)
class Targets:
    """The goals each export is checked against (accuracy in fractions: 0.01 is one point)."""

    int8_max_acc_drop: float = 0.01
    int8_min_speedup: float = 1.8
    onnx_min_speedup: float = 1.2
    onnx_max_abs_diff: float = 1e-4


def score(
    runtimes: dict[str, Runtime], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, dict[str, Any]]:
    """Val accuracy of every runtime, its agreement with the eager model's predictions and its max logit difference."""
    names = list(runtimes)
    correct = dict.fromkeys(names, 0)
    agree = dict.fromkeys(names, 0)
    max_diff = dict.fromkeys(names, 0.0)
    total = 0
    for images, labels in batches:
        reference = runtimes[REFERENCE].predict(images).float()
        expected = reference.argmax(dim=1)
        for name in names:
            logits = reference if name == REFERENCE else runtimes[name].predict(images).float()
            predicted = logits.argmax(dim=1)
            correct[name] += int((predicted == labels).sum())
            agree[name] += int((predicted == expected).sum())
            max_diff[name] = max(max_diff[name], float((logits - reference).abs().max()))
        total += len(labels)
    if not total:
        raise DataError(
            "No validation images were scored, so no accuracy, agreement or logit difference was measured and no "
            "target can be said to be met. Expected at least one image. Fix: check data.root's val split and "
            "export.val_images (null: all of them)."
        )
    return {
        name: {
            "val_images": total,
            "val_acc": correct[name] / total,
            "agreement": agree[name] / total,
            "max_abs_logit_diff": max_diff[name],
        }
        for name in names
    }


def time_runtimes(
    runtimes: dict[str, Runtime], image_size: int, *, warmup: int, runs: int, batch: int = 32
) -> dict[str, dict[str, float]]:
    """Median batch-1 latency (ms) and batch-`batch` throughput (images/s) of each runtime on the CPU."""
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "latency_ms_b1": torch.randn(1, 3, image_size, image_size, generator=generator),
        f"throughput_b{batch}": torch.randn(batch, 3, image_size, image_size, generator=generator),
    }
    times: dict[tuple[str, str], list[float]] = {(name, key): [] for name in runtimes for key in inputs}
    for key, images in inputs.items():
        for runtime in runtimes.values():
            for _ in range(warmup):
                runtime.predict(images)
        # Round robin: a burst of load from another process slows every format alike, not one of them.
        for _ in range(max(1, runs)):
            for name, runtime in runtimes.items():
                start = time.perf_counter()
                runtime.predict(images)
                times[name, key].append(time.perf_counter() - start)
    return {
        name: {
            "latency_ms_b1": statistics.median(times[name, "latency_ms_b1"]) * 1000.0,
            f"throughput_b{batch}": batch / statistics.median(times[name, f"throughput_b{batch}"]),
        }
        for name in runtimes
    }


def file_size_mb(path: Path | None, model: torch.nn.Module | None = None) -> float | None:
    """Size on disk; for the eager model, the bytes of its float state_dict."""
    if path is not None:
        return Path(path).stat().st_size / 1e6
    if model is not None:
        return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6
    return None


def assemble(rows: dict[str, dict[str, Any]], targets: Targets) -> dict[str, Any]:
    """Add speed-ups over eager and check the targets; returns the export_report.json content."""
    base = rows[REFERENCE]
    for row in rows.values():
        row["speedup_b1"] = base["latency_ms_b1"] / row["latency_ms_b1"]
        row["speedup_b32"] = row["throughput_b32"] / base["throughput_b32"]
    checks = []
    if "int8" in rows:
        drop = base["val_acc"] - rows["int8"]["val_acc"]
        checks.append(_check(INT8_ACCURACY_CHECK, drop * 100, targets.int8_max_acc_drop * 100, "<="))
        checks.append(
            _check(
                "int8 batch-32 throughput vs float eager (x)",
                rows["int8"]["speedup_b32"],
                targets.int8_min_speedup,
                ">=",
            )
        )
    if "onnx" in rows:
        checks.append(
            _check("onnxruntime batch-1 speed vs eager (x)", rows["onnx"]["speedup_b1"], targets.onnx_min_speedup, ">=")
        )
        checks.append(
            _check(
                "onnx max abs logit diff vs PyTorch",
                rows["onnx"]["max_abs_logit_diff"],
                targets.onnx_max_abs_diff,
                "<=",
            )
        )
    return {"formats": rows, "targets": checks, "machine": machine()}


def build_report(
    model: torch.nn.Module,
    info: DeployInfo,
    files: dict[str, Path],
    val_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    warmup: int,
    runs: int,
    targets: Targets,
) -> dict[str, Any]:
    """Load every exported file in its runtime, score it on the val batches, time it, and check the targets."""
    runtimes = {REFERENCE: eager_runtime(model, info)}
    runtimes.update({name: load_runtime(path) for name, path in files.items()})
    rows = score(runtimes, val_batches)
    timings = time_runtimes(runtimes, info.preprocessing.crop, warmup=warmup, runs=runs)
    for name in runtimes:
        path = files.get(name)
        rows[name] = {
            "file": str(path) if path else None,
            "size_mb": file_size_mb(path, model if path is None else None),
            **rows[name],
            **timings[name],
        }
    return assemble(rows, targets)


def _check(name: str, measured: float, target: float, op: str) -> dict[str, Any]:
    met = measured <= target if op == "<=" else measured >= target
    return {"name": name, "measured": measured, "target": f"{op} {target:g}", "met": bool(met)}


def machine() -> dict[str, Any]:
    """Where the timings were taken: they mean little without the CPU, threads and versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {"torch": torch.__version__}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the machine while timing
        **versions,
    }


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table (pasteable into a README), then one line per target."""
    columns = ("format", "file", "size MB", "val acc", "agreement", "max abs diff", "batch-1 ms", "batch-32 img/s")
    head = "| " + " | ".join((*columns, "speed-up b1 / b32")) + " |"
    lines = [head, "|" + " --- |" * 9]
    for name, row in report["formats"].items():
        lines.append(
            f"| {name} | {Path(row['file']).name if row.get('file') else '(in memory)'} | {row['size_mb']:.1f} "
            f"| {_pct(row['val_acc'])} | {_pct(row['agreement'])} | {row['max_abs_logit_diff']:.1e} "
            f"| {row['latency_ms_b1']:.2f} | {row['throughput_b32']:.0f} "
            f"| {row['speedup_b1']:.2f}x / {row['speedup_b32']:.2f}x |"
        )
    m = report["machine"]
    lines.append(
        f"\nCPU: {m['cpu']} ({m['cpu_capability']}), torch threads: {m['threads']}, load average {m['load_avg_1m']}, "
        f"torch {m['torch']}"
    )
    for check in report["targets"]:
        verdict = "met" if check["met"] else "MISSED"
        lines.append(f"- {check['name']}: {check['measured']:.4g} (target {check['target']}): {verdict}")
    return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"

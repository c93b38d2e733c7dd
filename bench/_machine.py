"""What every benchmark prints: one markdown table (figure, value, ratio to the baseline) and the machine it ran on.

Other bench scripts use it as::

    from _machine import Row, print_report, parse_args
    args = parse_args(__doc__, extra=lambda p: p.add_argument("--steps", type=int))
    print_report("Title", [Row("plain loop", 10.0, "images/s", 1.0), Row("ours", 9.9, "images/s", 0.99)])

Run a script as `python bench/NAME.py`, so bench/ is on sys.path and `import _machine` works.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Row:
    """One line of a benchmark table; `ratio` is value / baseline (None where there is no baseline)."""

    figure: str
    value: float | str
    unit: str = ""
    ratio: float | None = None
    note: str = ""


def cores() -> int:
    """CPU cores this process may use (the affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's marketing name, so a reader can compare their machine with ours."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming CPU, cores, GPU, the library versions and the load, the facts that move the numbers."""
    import torch  # imported here: the table helpers stay importable in a process without torch loaded yet

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        import torchvision

        tv = f", torchvision {torchvision.__version__}"
    except ImportError:
        tv = ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu_model()}, {cores()} cores, {gpu}; torch {torch.__version__}{tv}, Python {platform.python_version()}; "
        f"load average {load:.1f} at the end (above the core count means other work shared the CPU)"
    )


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _format(value: float | str) -> str:
    if isinstance(value, str):
        return value
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a GitHub markdown table; the note column appears only when a row has a note."""
    with_notes = any(row.note for row in rows)
    head = ["figure", "value", "ratio to baseline"] + (["note"] if with_notes else [])
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * 2 + (["---"] if with_notes else [])) + "|",
    ]
    for row in rows:
        value = f"{_format(row.value)} {row.unit}".strip()
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}x"
        cells = [row.figure, value, ratio] + ([row.note] if with_notes else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_report(title: str, rows: Sequence[Row], notes: Sequence[str] = ()) -> None:
    """Print the title, the table, any notes, and the machine line, ready to paste into the README."""
    print(f"\n### {title}\n")
    print(markdown_table(rows))
    print()
    for note in notes:
        print(note)
    print(f"Machine: {machine()}.")
    sys.stdout.flush()


def ratio(value: float, baseline: float) -> float | None:
    """value / baseline, or None when the baseline is zero or missing."""
    return value / baseline if baseline else None


def parse_args(
    doc: str | None, extra: Callable[[argparse.ArgumentParser], object] | None = None, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """The flags every bench script shares (--quick) plus its own; the defaults are the full-size run."""
    parser = argparse.ArgumentParser(
        description=(doc or "").strip().splitlines()[0] if doc else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run for CI, numbers meaningless")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)

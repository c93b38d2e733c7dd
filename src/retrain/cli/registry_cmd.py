"""`retrain registry [--model-dir DIR] list|show|gc`: see, inspect and clean up the published model versions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from retrain.artifacts.registry import METADATA_FILE, list_versions, resolve, version_dirname
from retrain.artifacts.registry_gc import DEFAULT_GC_HOURS, GC_COMMAND, check_reservations, collect_garbage
from retrain.utils.io import read_json

# Shown first when present; other metrics follow alphabetically, up to MAX_METRIC_COLUMNS in all.
PREFERRED_METRICS = ("test/acc", "val/acc", "val/f1", "val/loss")
MAX_METRIC_COLUMNS = 4


def default_model_dir() -> Path:
    """The registry folder when none is given: $RETRAIN_MODEL_DIR, else ./models."""
    return Path(os.environ.get("RETRAIN_MODEL_DIR") or "models")


def _metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    present = {key for row in rows for key in row["metrics"]}
    preferred = [key for key in PREFERRED_METRICS if key in present]
    return (preferred + sorted(present - set(preferred)))[:MAX_METRIC_COLUMNS]


def _format_metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def _table(name: str, rows: list[dict[str, Any]]) -> Table:
    metrics = _metric_columns(rows)
    table = Table(title=name, title_justify="left")
    table.add_column("version", no_wrap=True)
    table.add_column("created", no_wrap=True)
    for key in metrics:
        table.add_column(key, justify="right", no_wrap=True)
    table.add_column("parent")
    for row in rows:
        version = version_dirname(row["version"]) + (" (latest)" if row["latest"] else "")
        created = (row["created"] or "-").replace("T", " ")[:16]
        values = [_format_metric(row["metrics"].get(key)) for key in metrics]
        parent = row["parent"] or ("metadata unreadable" if row["problem"] else "-")
        table.add_row(version, created, *values, parent)
    return table


def _abandoned_note(model_dir: Path, name: str | None) -> str | None:
    abandoned = sum(check.abandoned for check in check_reservations(model_dir, name))
    if not abandoned:
        return None
    what = "reservation" if abandoned == 1 else "reservations"
    return (
        f"{abandoned} abandoned {what} (hidden .vNNN.partial folders left by killed runs) in {model_dir}. "
        f"Remove with: {GC_COMMAND} (add --dry-run to preview)"
    )


def _gc(model_dir: Path, older_than_hours: float, dry_run: bool) -> None:
    checks = collect_garbage(model_dir, older_than_hours, dry_run=dry_run)
    for check in checks:
        print(f"{check.action:<12} {check.reservation.name}/{check.reservation.staging.name}: {check.reason}")
    if not checks:
        print(f"No reservations in {model_dir}: nothing to collect.")
        return
    counts = Counter(check.action for check in checks)
    what = "reservation" if len(checks) == 1 else "reservations"
    print(f"{len(checks)} {what}: " + ", ".join(f"{n} {action}" for action, n in counts.items()) + ".")


def _non_negative_hours(text: str) -> float:
    try:
        hours = float(text)
    except ValueError:
        hours = float("nan")
    if not hours >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of hours >= 0, got {text!r}")
    return hours


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `retrain registry`'s options and its list/show/gc subcommands."""
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="registry folder (default: $RETRAIN_MODEL_DIR or ./models)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    list_cmd = commands.add_parser("list", help="table of versions: date, metrics, parent")
    list_cmd.add_argument("name", nargs="?", help="only this model's versions")
    show_cmd = commands.add_parser("show", help="print one version's metadata.json")
    show_cmd.add_argument("ref", help="name@v3, name@3, name@latest or name")
    gc_cmd = commands.add_parser("gc", help="remove reservations (.vNNN.partial) abandoned by killed runs")
    gc_cmd.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    gc_cmd.add_argument(
        "--older-than-hours",
        type=_non_negative_hours,
        default=DEFAULT_GC_HOURS,
        metavar="H",
        help="for owners on another host or unknown: remove when untouched this long (default: %(default)g)",
    )


def run(args: argparse.Namespace) -> int:
    """List, show or garbage-collect the registry's versions."""
    model_dir = args.model_dir or default_model_dir()
    # Piped output is not squeezed into rich's default 80 columns; tables keep their natural width.
    console = Console() if sys.stdout.isatty() else Console(width=250)
    if args.command == "list":
        rows = list_versions(model_dir, args.name)
        for name in dict.fromkeys(row["name"] for row in rows):
            console.print(_table(name, [row for row in rows if row["name"] == name]))
        if not rows:
            console.print(f"No published models in {model_dir}.")
        if note := _abandoned_note(model_dir, args.name):
            print(note)
    elif args.command == "gc":
        _gc(model_dir, args.older_than_hours, args.dry_run)
    else:
        metadata = read_json(resolve(model_dir, args.ref) / METADATA_FILE)
        console.print_json(json.dumps(metadata))
    return 0

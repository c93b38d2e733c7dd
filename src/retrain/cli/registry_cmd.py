"""`retrain registry [--model-dir DIR] list|show|verify|gc`: see, inspect, check and clean up the published versions."""

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

from retrain.artifacts.integrity import VersionCheck, verify_version
from retrain.artifacts.registry import METADATA_FILE, list_versions, resolve, version_dirname
from retrain.artifacts.registry_gc import DEFAULT_GC_HOURS, GC_COMMAND, check_reservations, collect_garbage
from retrain.errors import ArtifactError
from retrain.utils.io import read_json

# Shown first when present; other metrics follow alphabetically, up to MAX_METRIC_COLUMNS in all.
PREFERRED_METRICS = ("test/acc", "val/acc", "val/f1", "val/loss")
MAX_METRIC_COLUMNS = 4
SHOWN_CLASSES = 3  # class names shown in the list, after the count


def default_model_dir() -> Path:
    """The registry folder when none is given: $RETRAIN_MODEL_DIR, else ./models."""
    return Path(os.environ.get("RETRAIN_MODEL_DIR") or "models")


def _metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    present = {key for row in rows for key in row["metrics"]}
    preferred = [key for key in PREFERRED_METRICS if key in present]
    return (preferred + sorted(present - set(preferred)))[:MAX_METRIC_COLUMNS]


def _format_metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def _classes(names: list[str]) -> str:
    if not names:
        return "-"
    shown = ", ".join(names[:SHOWN_CLASSES]) + (", ..." if len(names) > SHOWN_CLASSES else "")
    return f"{len(names)}: {shown}"


def _monitor(row: dict[str, Any]) -> str:
    if row["monitor"] is None:
        return "-"
    return f"{row['monitor']} {_format_metric(row['monitor_value'])}"


def _table(name: str, rows: list[dict[str, Any]]) -> Table:
    metrics = _metric_columns(rows)
    table = Table(title=name, title_justify="left")
    table.add_column("version", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("classes")
    table.add_column("monitor (best)", no_wrap=True)
    for key in metrics:
        table.add_column(key, justify="right", no_wrap=True)
    table.add_column("parent")
    for row in rows:
        version = version_dirname(row["version"]) + (" (latest)" if row["latest"] else "")
        created = (row["created"] or "-").replace("T", " ")[:16]
        values = [_format_metric(row["metrics"].get(key)) for key in metrics]
        parent = row["parent"] or ("metadata unreadable" if row["problem"] else "-")
        table.add_row(version, created, _classes(row["classes"]), _monitor(row), *values, parent)
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


def _verify(model_dir: Path, ref: str | None) -> None:
    """Check versions against their recorded hashes; one line each, and an error (exit 1) naming the bad ones."""
    if ref is not None and "@" in ref:
        folders = [resolve(model_dir, ref)]
    else:
        folders = [Path(row["path"]) for row in list_versions(model_dir, ref)]
    checks: list[VersionCheck] = []
    for folder in folders:
        check = verify_version(folder)
        checks.append(check)
        if check.problems:
            print(f"FAILED      {check.label}")
            for problem in check.problems:
                print(f"            {problem}")
        elif check.unverified:
            print(f"unverified  {check.label}: {check.unverified}")
        else:
            print(f"ok          {check.label}: {check.files} files, {check.size / 1e6:.1f} MB as published")
    if not checks:
        print(f"No published models in {model_dir}: nothing to verify.")
    failed = [check.label for check in checks if check.problems]
    if failed:
        raise ArtifactError(
            f"{len(failed)} of {len(checks)} versions in {model_dir} differ from what was published: "
            f"{', '.join(failed)} (details above). Expected every file to match the SHA-256 in its metadata.json, "
            "and metadata.json to match the copy in model.safetensors. Fix: restore those versions from a backup "
            "or a copy of the registry, or stop using them (load an intact version instead)."
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
    list_cmd = commands.add_parser("list", help="table of versions: date, classes, monitored value, metrics, parent")
    list_cmd.add_argument("name", nargs="?", help="only this model's versions")
    show_cmd = commands.add_parser("show", help="print one version's metadata.json")
    show_cmd.add_argument("ref", help="name@v3, name@3, name@latest or name")
    verify_cmd = commands.add_parser(
        "verify", help="check versions' files against the SHA-256 recorded at publish (exit 1 on any change)"
    )
    verify_cmd.add_argument("ref", nargs="?", help="name@v3 (one version) or name (all its versions); default: all")
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
    """List, show, verify or garbage-collect the registry's versions."""
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
    elif args.command == "verify":
        _verify(model_dir, args.ref)
    else:
        metadata = read_json(resolve(model_dir, args.ref) / METADATA_FILE)
        console.print_json(json.dumps(metadata))
    return 0

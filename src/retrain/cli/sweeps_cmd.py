"""`retrain sweeps summarize DIR`: rebuild a sweep's summary (sweep_summary.csv and .md) from its job dirs."""

from __future__ import annotations

import argparse
from pathlib import Path

from retrain.sweeps import write_summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `retrain sweeps`' summarize subcommand."""
    commands = parser.add_subparsers(dest="command", required=True)
    summarize = commands.add_parser("summarize", help="write sweep_summary.csv and .md in DIR")
    summarize.add_argument(
        "sweep_dir", type=Path, metavar="DIR", help="a sweep dir: logs/train/multiruns/<name>/<time>"
    )


def run(args: argparse.Namespace) -> int:
    """Write the summary and print its table."""
    csv_path, md_path = write_summary(args.sweep_dir)
    print(md_path.read_text(), end="")
    print(f"\nwrote {csv_path} and {md_path}")
    return 0

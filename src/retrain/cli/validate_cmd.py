"""`retrain validate DIR [--full]`: scan an image folder before training; exit 1 when training would stop."""

from __future__ import annotations

import argparse

from rich.console import Console

from retrain.data.validate import scan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `retrain validate`'s options."""
    parser.add_argument("root", metavar="DIR", help="the data folder (split or folder layout)")
    parser.add_argument("--full", action="store_true", help="decode every image instead of reading headers")
    parser.add_argument("--max-rows", type=int, default=20, help="paths listed per problem kind (20)")


def run(args: argparse.Namespace) -> int:
    """Print the folder's report; 1 when training would stop on it."""
    console = Console(highlight=False, soft_wrap=True, emoji=False)
    report = scan(args.root, mode="full" if args.full else "quick")
    console.print(report.format(max_rows=args.max_rows), markup=False)
    if report.has_errors():
        console.print("[bold red]FAIL[/]: training would stop on the errors above.")
        return 1
    console.print("[bold green]OK[/]: nothing would stop training.")
    return 0

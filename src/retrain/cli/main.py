"""The `retrain` command: one entry point for the tools around training (the Hydra tasks stay `python train.py`).

Exit codes, the same for every subcommand:
  0    done
  1    a user mistake or a check that failed; the message says what was found and how to fix it
  2    the command line itself is wrong (argparse usage error)
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from retrain.errors import RetrainError

# name -> (module with add_arguments/run, one-line help). Modules are imported only when their command runs,
# so `retrain registry list` never pays for torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "registry": ("retrain.cli.registry_cmd", "list, show or clean up published model versions"),
    "report": ("retrain.cli.report_cmd", "rebuild a run's report (plots, per-class table, report.md)"),
    "sweeps": ("retrain.cli.sweeps_cmd", "rebuild a sweep's summary table from its job folders"),
    "validate": ("retrain.cli.validate_cmd", "scan an image folder for what would stop or spoil training"),
    "demo-data": ("retrain.cli.demo_cmd", "build the offline demo image folder"),
}
EXIT_OK, EXIT_USER_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def run_cli(command: Callable[[], int]) -> int:
    """Run one command under the documented exit codes: a RetrainError prints one paragraph, never a traceback."""
    try:
        return command()
    except RetrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrain",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`retrain COMMAND ...`: parse the command name, then hand the rest to that command's own parser."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        _top_parser().parse_args(args)  # prints the help or the usage error, and exits
        return EXIT_USAGE
    name, rest = args[0], args[1:]
    module_name, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"retrain {name}", description=(module.__doc__ or "").split("\n\n")[0])
    module.add_arguments(parser)
    parsed = parser.parse_args(rest)
    return run_cli(lambda: int(module.run(parsed)))


def legacy_entry(name: str) -> int:
    """Keep `python -m retrain.<old module>` working, and say the command that replaces it."""
    print(f"note: this is now `retrain {name}` (python -m still works)", file=sys.stderr)
    return main([name, *sys.argv[1:]])

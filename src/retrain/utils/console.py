"""What a person sees in the terminal: the config tree at start, one summary panel at the end, and less noise."""

from __future__ import annotations

import logging
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

# Groups first, in the order a reader checks them; any other top-level key follows in config order.
CONFIG_ORDER = ("data", "model", "trainer", "callbacks", "logger", "paths")

# Warnings a user cannot act on, matched by message (re.match, case-insensitive), never silenced wholesale.
KNOWN_NOISE_WARNINGS = (
    # Lightning's own pytree helper calls an API that newer torch deprecates; nothing to change on our side.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # The data module already picks num_workers from the core count; on small machines this cannot be raised.
    r"The '\w+' does not have many workers",
    # Frozen stages keep BatchNorm in eval mode on purpose (model.train_bn=false), which Lightning flags.
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # torchdata's StatefulDataLoader (the train loader) still calls torch.set_vital, which torch deprecates.
    r"'set_vital' is deprecated",
)
# Log records, by logger name and message substring: adverts for Lightning's cloud products, and MLflow's
# note that it creates the experiment on a first run.
KNOWN_NOISE_LOGS = {
    "lightning.pytorch.utilities.rank_zero": ("[litlogger](", "[litmodels]("),
    "lightning.fabric.utilities.rank_zero": ("[litlogger](", "[litmodels]("),
    "lightning.pytorch.loggers.mlflow": ("not found. Creating it.",),
}
# Loggers that chat at INFO about their own setup: MLflow announcing that it creates its SQLite tables.
QUIET_LOGGERS = ("mlflow.store.db.utils",)
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


def _drop_known_noise(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(text in message for text in KNOWN_NOISE_LOGS.get(record.name, ()))


def _strip_trailing_newline(record: logging.LogRecord) -> bool:
    # logging.captureWarnings passes warnings.formatwarning's text, which ends with a newline.
    record.msg, record.args = record.getMessage().rstrip(), None
    return True


def filter_known_warnings() -> None:
    """Hide the known, unactionable Lightning/torch warnings and tips by message; every other warning still shows."""
    for pattern in KNOWN_NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in KNOWN_NOISE_LOGS:
        logger = logging.getLogger(name)
        if _drop_known_noise not in logger.filters:
            logger.addFilter(_drop_known_noise)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def send_library_logs_to_run_log() -> None:
    """Route Lightning's messages and Python warnings through Hydra's handlers: the terminal and the run log.

    Depending on whether it was imported before Hydra configured logging, Lightning either keeps its messages
    to its own terminal handlers (so the run log misses them) or prints them twice. Dropping its handlers and
    letting the records propagate gives one copy of each, in both places.
    """
    if not logging.getLogger().handlers:  # outside a Hydra job: leave Lightning's own terminal output alone
        return
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)  # warnings go through the root handlers: terminal and run log
    py_warnings = logging.getLogger("py.warnings")
    if _strip_trailing_newline not in py_warnings.filters:
        py_warnings.addFilter(_strip_trailing_newline)


def without_disabled_progress_bar(callbacks: list[L.Callback], enabled: bool) -> list[L.Callback]:
    """Drop the configured progress bar when `trainer.enable_progress_bar=false` (Lightning rejects both at once).

    The default is `${stdout_isatty:}`: the Rich bar in a terminal, none in a job log or a pipe, where the
    EpochLog callback writes one line per epoch instead.
    """
    return callbacks if enabled else [cb for cb in callbacks if not isinstance(cb, ProgressBar)]


def log_to_run_log_only(logger: logging.Logger, message: str) -> None:
    """Write an INFO line to the run log files only: on screen a progress bar already shows the same facts."""
    if not logger.isEnabledFor(logging.INFO):
        return
    record = logger.makeRecord(logger.name, logging.INFO, "(run log)", 0, message, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


def _console() -> Console:
    # Piped output (logs, CI) is not squeezed into 80 columns, so long paths stay on one line.
    return Console() if sys.stdout.isatty() else Console(width=200)


@rank_zero_only
def print_config_tree(cfg: DictConfig, order: Sequence[str] = CONFIG_ORDER) -> None:
    """Print the resolved config as a tree of YAML blocks, one branch per group, so a run's setup is visible."""
    tree = Tree("config", guide_style="dim")
    groups = [k for k in order if k in cfg] + [k for k in cfg if k not in order and OmegaConf.is_dict(cfg[k])]
    scalars = {k: cfg[k] for k in cfg if k not in groups}  # name, seed, monitor, ...: one branch for all
    branches = [(str(k), cfg[k]) for k in groups] + ([("run", OmegaConf.create(scalars))] if scalars else [])
    for label, node in branches:
        text = OmegaConf.to_yaml(node, resolve=True).rstrip()
        tree.add(label, style="bold").add(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    _console().print(tree)


def _shown(path: str | Path) -> str:
    """A path relative to the working folder when it lies inside it (shorter to read and to paste)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _command(*args: str) -> str:
    return " ".join(shlex.quote(arg) for arg in args)


def next_commands(results: dict[str, Any], cfg: DictConfig) -> dict[str, str]:
    """The commands that evaluate, predict with and export the model this run produced (none: it kept no model)."""
    registry = results.get("registry")
    checkpoint = results.get("best_checkpoint") or results.get("last_checkpoint")
    if registry:
        default_model_dir = (Path.cwd() / "models").resolve()
        in_default = Path(str(cfg.paths.model_dir)).resolve() == default_model_dir
        source = f"{registry['name']}@v{int(registry['version']):03d}" if in_default else _shown(registry["path"])
    elif checkpoint:
        source = _shown(checkpoint)
    else:
        return {"saved": "no model: no checkpoint, nothing published (fast_dev_run, or no checkpoints and no publish)"}
    root = Path(str(cfg.data.root))
    images = root / "test" if (root / "test").is_dir() else root
    return {
        "evaluate": _command("python", "eval.py", f"ckpt_path={source}", f"data.root={_shown(root)}"),
        "predict": _command("python", "predict.py", f"ckpt_path={source}", f"input={_shown(images)}"),
        "export": _command("python", "export.py", f"ckpt_path={source}", "formats=[onnx]"),
    }


def summary_panel(results: dict[str, Any], cfg: DictConfig) -> Panel:
    """One panel: the best metric, where the checkpoint, registry version and report are, and what to run next."""
    value = results.get("monitor_value")
    best = "n/a" if value is None else f"{value:.4f}"
    if results.get("best_epoch") is not None:
        best += f" (epoch {results['best_epoch']})"
    test = ", ".join(f"{k} {v:.4f}" for k, v in sorted((results.get("test") or {}).items()) if k.endswith("acc"))
    run_dir = Path(results["run_dir"])
    rows = [
        (f"best {results.get('monitor')}", best + (f"   test: {test}" if test else "")),
        ("best checkpoint", _shown(results["best_checkpoint"]) if results.get("best_checkpoint") else "-"),
    ]
    if results.get("registry"):
        rows.append(("registry", _shown(results["registry"]["path"])))
    if results.get("report"):
        rows.append(("report", _shown(Path(results["report"]) / "report.md")))
    rows += [("results", _shown(run_dir / "results.json")), ("log", _shown(run_dir / f"{cfg.task_name}.log"))]
    rows += [("", ""), *next_commands(results, cfg).items()]
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")
    for label, text in rows:
        facts.add_row(label, Text(text))  # Text, not markup: `formats=[onnx]` and paths may hold brackets
    return Panel(facts, title=f"[bold]{results.get('name')}[/bold] trained", expand=False, border_style="green")


def print_summary(results: dict[str, Any], cfg: DictConfig) -> None:
    """Print the end-of-run panel (the run log gets the same facts as one line)."""
    logging.getLogger("retrain").info(
        "finished: best %s=%s, checkpoint %s, published %s",
        results.get("monitor"),
        results.get("monitor_value"),
        results.get("best_checkpoint"),
        (results.get("registry") or {}).get("path"),
    )
    _console().print(summary_panel(results, cfg))

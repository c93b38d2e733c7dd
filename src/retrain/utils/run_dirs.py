"""Which folder a training session writes to: Hydra's new one, or the folder of the run it goes on with.

A run stopped and resumed with `ckpt_path=last`, or requeued by its scheduler, reads as one run: its checkpoints,
metrics.csv, TensorBoard events, results.json, report and train.log stay in the folder the first session made.
A `ckpt_path=last` session's own Hydra folder keeps only what Hydra wrote at its start (its `.hydra/` and the first
lines of its log) and a note saying where the run went on. A resume from an explicit `ckpt_path=FILE`, or with
`hydra.run.dir` set, writes to a new folder, as before.
"""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig, open_dict

from retrain.utils.ranks import is_rank_zero

log = logging.getLogger("retrain")

CONTINUED_NOTE = "continued_in.txt"  # in a resumed session's own Hydra folder: the run folder it wrote to
TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"


def continued_run(cfg: DictConfig, resume_path: Path | None, session_dir: Path) -> Path | None:
    """The run folder this session goes on in (None: a run of its own, in `session_dir`).

    A requeued job, resuming from the last.ckpt of its own folder, goes on there; a `ckpt_path=last` resume goes on
    in the folder its last.ckpt lies in, unless the user chose the folder (`hydra.run.dir`).
    """
    if resume_path is None:
        return None
    folder = resume_path.parent.parent
    if folder == session_dir:
        return folder
    if str(cfg.ckpt_path) != "last" or not HydraConfig.initialized():
        return None
    # DDP's other ranks are relaunched with rank 0's hydra.run.dir: they follow rank 0.
    if is_rank_zero() and any(o.startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra):
        return None
    return folder


def first_logged_step(checkpoint: dict[str, Any]) -> int:
    """The logger step the resumed run logs first: rows an earlier session logged from there on are replaced.

    Lightning counts optimizer steps in `_batches_that_stepped`; a checkpoint taken in on_train_batch_end (a rolling
    one) is saved before that step is counted, and Lightning counts it when it restores the checkpoint.
    """
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    stepped = int(loops.get("epoch_loop.state_dict", {}).get("_batches_that_stepped", 0))
    batches = loops.get("epoch_loop.batch_progress", {}).get("total", {})
    return stepped + int(batches.get("processed", 0) == batches.get("completed", 0) + 1)


def continue_run(cfg: DictConfig, run_dir: Path, session_dir: Path, resume_step: int) -> None:
    """Point this session's outputs at `run_dir`: every `${paths.output_dir}` path, the run log, and TensorBoard,
    which drops the events the earlier session logged after its checkpoint (`resume_step` on)."""
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        for logger_cfg in (cfg.get("logger") or {}).values():
            if logger_cfg is not None and logger_cfg.get("_target_") == TENSORBOARD:
                logger_cfg.purge_step = resume_step
    # Lightning's notes that the checkpoint and CSV folders are not empty are the point here (keep_earlier_metrics
    # writes the earlier rows back).
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    if not is_rank_zero() or run_dir == session_dir:
        return
    log.info("ckpt_path=last: continuing the run in %s (this session's Hydra folder is %s)", run_dir, session_dir)
    (session_dir / CONTINUED_NOTE).write_text(f"{run_dir}\n")
    _move_run_log(session_dir, run_dir)


def _move_run_log(session_dir: Path, run_dir: Path) -> None:
    """Append this session's log so far to the run's own log, and send the rest of it there too."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if not isinstance(handler, logging.FileHandler) or Path(handler.baseFilename).parent != session_dir:
            continue
        handler.flush()
        name = Path(handler.baseFilename).name
        so_far = Path(handler.baseFilename).read_text() if Path(handler.baseFilename).is_file() else ""
        with (run_dir / name).open("a") as run_log:
            run_log.write(so_far)
        moved = logging.FileHandler(run_dir / name, mode="a", encoding=handler.encoding)
        moved.setFormatter(handler.formatter)
        moved.setLevel(handler.level)
        root.addHandler(moved)
        root.removeHandler(handler)
        handler.close()


def keep_earlier_metrics(loggers: list[Logger], resume_step: int) -> None:
    """Keep the rows an earlier session wrote to metrics.csv before `resume_step` (CSVLogger would delete the file)."""
    for logger in loggers:
        if not isinstance(logger, CSVLogger) or not is_rank_zero():
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as file:
            rows = [row for row in csv.DictReader(file) if row.get("step") and int(row["step"]) < resume_step]
        writer = logger.experiment  # creating it deletes the old file: write the kept rows back at once
        writer.metrics[:0] = rows
        writer.save()

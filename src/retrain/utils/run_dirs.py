"""Which folder a training session writes to: Hydra's new one, or the folder of the run it goes on with.

A run stopped and resumed with `ckpt_path=last`, or requeued by its scheduler, reads as one run: its checkpoints,
metrics.csv, TensorBoard events, results.json, report and train.log stay in the folder the first session made.
A `ckpt_path=last` session's own Hydra folder keeps only what Hydra wrote at its start (its `.hydra/` and the first
lines of its log) and a note saying where the run went on. A resume from an explicit `ckpt_path=FILE`, or with
`hydra.run.dir` set, writes to a new folder, as before.
"""

from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig, open_dict

from retrain.errors import ConfigError
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


def newest_last_checkpoint(runs: Path, name: str) -> Path:
    """The file `ckpt_path=last` resumes: the newest `<runs>/*/checkpoints/last.ckpt`, unless a newer run lost its own.

    Going on with an older run's last.ckpt when the newest run's is gone (deleted, or its folder moved) would resume
    another run, in that run's folder, as if it were the one asked for. So a run folder whose checkpoints/ changed
    after that file and holds no last.ckpt, a newer run that saved no checkpoint at all and did not end well (killed
    before its first save: its split.json, written once its data and weights loaded, is newer), or a newer session whose
    continued_in.txt names a folder that no longer exists, stops the resume with an error naming both. A run that
    failed before its split.json (a typo in a path) does not count; a continued_in.txt that names no folder is only a
    note (nothing reads it to resume): it is ignored.
    """
    # is_file: a last.ckpt that is a link to a file gone counts as missing, not as a crash in stat()
    found = sorted((p for p in runs.glob("*/checkpoints/last.ckpt") if p.is_file()), key=lambda p: p.stat().st_mtime)
    newest = found[-1] if found else None
    since = newest.stat().st_mtime if newest else float("-inf")
    folders = sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
    lost = [loss for folder in folders if (loss := _lost_after(folder, since))]
    if lost:
        _, what, others = max(lost)
        fixes = [] if others is None else ["put the missing file or folder back and run the same command again"]
        fixes += [f"ckpt_path={others[-1]} goes on from that run's newest other checkpoint"] if others else []
        if newest is not None:
            fixes.append(f"ckpt_path={newest} goes on with the older run")
        fixes.append("leaving ckpt_path out starts a new run")
        older = f"{newest}, an older run's" if newest else "none"
        raise ConfigError(
            f"ckpt_path=last: {what}; the newest last.ckpt of {name!r} left is {older}. Expected the newest run's "
            "own last.ckpt: going on with another run's would resume a different run as if it were this one. "
            f"Fix: {'; or '.join(fixes)}."
        )
    if newest is None:
        raise ConfigError(
            f"ckpt_path=last found no last.ckpt under {runs}/*/checkpoints/. Expected an earlier run named "
            f"{name!r}. Fix: pass name=<the earlier run's name>, or ckpt_path=/path/to/file.ckpt."
        )
    return newest


def _lost_after(folder: Path, since: float) -> tuple[float, str, list[Path] | None] | None:
    """When and how `folder` shows a run newer than `since` whose last.ckpt is gone, and the checkpoints left
    (None: the run never saved one, so there is nothing to put back)."""
    checkpoints = folder / "checkpoints"
    if checkpoints.is_dir() and not (checkpoints / "last.ckpt").is_file() and checkpoints.stat().st_mtime > since:
        others = sorted((p for p in checkpoints.rglob("*.ckpt") if p.is_file()), key=lambda p: p.stat().st_mtime)
        what = f"the newest run, {folder}, has no checkpoints/last.ckpt (deleted or moved?)"
        return checkpoints.stat().st_mtime, what, others
    started = folder / "split.json"
    newer_start = not checkpoints.exists() and started.is_file() and started.stat().st_mtime > since
    # A run that ended well without checkpoints (callbacks=none) did not die: not the one `ckpt_path=last` meant.
    if newer_start and run_results(folder).get("status") != "ok":
        what = (
            f"the newest run, {folder}, saved no checkpoint (no checkpoints/ folder: it stopped before its first "
            "save), so it has nothing to go on from"
        )
        return started.stat().st_mtime, what, None
    note = folder / CONTINUED_NOTE
    if note.is_file() and note.stat().st_mtime > since:
        try:
            text = note.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        target = Path(text)
        names_a_folder = target.is_absolute() and "\n" not in text and target != Path(target.anchor)
        if names_a_folder and not target.exists():
            what = f"the newest session, {folder}, went on in {target} ({CONTINUED_NOTE}), which no longer exists"
            return note.stat().st_mtime, what, []
    return None


def run_results(folder: Path) -> dict[str, Any]:
    """What the run in `folder` recorded in its results.json ({} when there is none, or it is unreadable)."""
    path = folder / "results.json"
    if not path.is_file():
        return {}
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
        log.warning("%s could not be read (%s): taken as a job that left no results", path, error)
        return {}
    return results if isinstance(results, dict) else {}


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

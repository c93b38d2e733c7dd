"""Where a training run starts from: `ckpt_path` (a file, `last`, or a requeued job's own last.ckpt) and, after a
stop, which checkpoint the rerun goes on from."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from retrain.callbacks.checkpoint import VersionedCheckpoint
from retrain.errors import ConfigError
from retrain.utils.hydra import output_dir
from retrain.utils.run_dirs import newest_last_checkpoint, run_results

log = logging.getLogger("retrain")


# results.json statuses of a run that stopped before its end, which a requeued job picks up (none: it was killed).
UNFINISHED = (None, "preempted", "interrupted")


def resolve_resume(cfg: DictConfig) -> Path | None:
    """Turn `ckpt_path` (a path or `last`) into an existing checkpoint file, or explain what is missing.

    Without `ckpt_path`, a job that starts again in its own run folder (requeued by SLURM or submitit) resumes
    from the last.ckpt it left there, unless its results.json says it ended otherwise than stopped.
    """
    if cfg.ckpt_path is None:
        own = output_dir() / "checkpoints" / "last.ckpt"
        earlier = run_results(output_dir())
        status = earlier.get("status")
        if status in ("preempted", "interrupted") and earlier.get("checkpoint") == str(own) and not own.is_file():
            raise ConfigError(
                f"This run folder's results.json says the run stopped ({status}) and saved {own}, which is gone "
                "(deleted or moved?). Expected it, to go on from there: starting over here would write over that "
                f"run. Fix: put the file back and start the job again; or, to start over in this folder, delete "
                f"{output_dir() / 'results.json'}."
            )
        if not own.is_file() or status not in UNFINISHED:
            return None
        log.info("This run folder holds the last.ckpt of an earlier start of this job (requeued): resuming from it")
        return own
    if str(cfg.ckpt_path) == "last":
        return newest_last_checkpoint(Path(cfg.paths.log_dir) / "train" / "runs" / str(cfg.name), str(cfg.name))
    path = Path(str(cfg.ckpt_path)).expanduser().resolve()
    if not path.is_file():
        nearby = sorted(p.name for p in path.parent.glob("*.ckpt"))[:10] if path.parent.is_dir() else []
        hint = f" .ckpt files in that folder: {nearby}." if nearby else ""
        raise ConfigError(
            f"ckpt_path={path} does not exist.{hint} Expected a Lightning checkpoint of an earlier run. "
            "Fix: pass an existing file, or ckpt_path=last for the newest last.ckpt of this run name."
        )
    return path


def resume_point(checkpoints: list[VersionedCheckpoint], resume_path: Path | None) -> Path | None:
    """What a rerun after a SIGTERM resumes from: the last.ckpt this run wrote, else the file it resumed from.

    A run that resumed a finished fit writes no checkpoint at all, and Lightning does not carry `last_model_path`
    over from another run's folder.
    """
    return next((Path(cb.last_model_path) for cb in checkpoints if cb.last_model_path), resume_path)

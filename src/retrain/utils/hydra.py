"""Hydra glue shared by the entry points: unique run ids, and turning user mistakes into one-paragraph errors."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from retrain.errors import RetrainError

log = logging.getLogger("retrain")


def _run_id() -> str:
    # Time for sorting, pid and random bits so two runs started in the same second never collide.
    now = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return f"{now}_{os.getpid()}{secrets.token_hex(2)}"


def register_resolvers() -> None:
    """Make `${run_id:}` (cached: one value per process) and `${abspath:PATH}` available to the configs."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", _run_id, use_cache=True)
    if not OmegaConf.has_resolver("abspath"):
        OmegaConf.register_new_resolver("abspath", lambda path: os.path.abspath(os.path.expanduser(path)))


def output_dir() -> Path:
    """This job's Hydra output folder (the run directory)."""
    return Path(HydraConfig.get().runtime.output_dir)


def is_multirun() -> bool:
    """Whether this job is one of a `-m` sweep."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def write_failure(error: BaseException) -> None:
    """Leave a results.json saying the job failed and why, so sweep summaries can count it."""
    path = output_dir() / "results.json"
    if path.exists():
        return
    payload = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    path.write_text(json.dumps(payload, indent=2))


def run_task(task: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig) -> float | None:
    """Run a task; print user mistakes as one paragraph (full trace with HYDRA_FULL_ERROR=1).

    In a multirun a failed job is recorded and the sweep goes on (unless `sweep.fail_fast=true`); the return value
    is the monitored metric, which sweepers such as Optuna optimize (NaN marks a failed trial).
    """
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    fail_fast = bool(OmegaConf.select(cfg, "sweep.fail_fast", default=False))
    try:
        results = task(cfg)
    except Exception as error:
        if HydraConfig.initialized():
            write_failure(error)
        if is_multirun() and not fail_fast:
            log.exception("job failed; the sweep goes on (sweep.fail_fast=true stops it)")
            return math.nan
        if full_error or not isinstance(error, RetrainError):
            raise
        print(f"\nerror: {error}\n(set HYDRA_FULL_ERROR=1 for the full traceback)", file=sys.stderr)
        sys.exit(1)
    value = results.get("monitor_value")
    return None if value is None else float(value)

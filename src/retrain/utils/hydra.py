"""Hydra glue shared by the entry points: launching a task, unique run ids, one-paragraph errors for mistakes.

Kept free of Lightning at import time: an entry script composes its config and reports a typo before the task
(and with it Lightning, ~7 s) is imported.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import logging
import math
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from retrain.errors import ConfigError, RetrainError
from retrain.utils.cli import check_types, with_config_hints
from retrain.utils.fast_exit import exit_without_teardown
from retrain.utils.io import read_json, write_json
from retrain.utils.schemas import register_schemas

log = logging.getLogger("retrain")
STUDY_FILE = "optuna.db"
STUDY_MONITOR_FILE = "optuna_monitor.json"  # beside optuna.db: the monitor and monitor_mode of its values


def _run_id() -> str:
    # Time for sorting, pid and random bits so two runs started in the same second never collide.
    now = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return f"{now}_{os.getpid()}{secrets.token_hex(2)}"


def cpu_precision() -> str:
    """bf16-mixed where the CPU has native bf16 (AVX512_BF16 or AMX), else 32-true: emulated bf16 is slower."""
    import torch  # here, so configs that never ask for it do not pay for the import

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16-mixed" if native else "32-true"


def study_storage(resume: Any, sweep_dir: str, monitor: str, mode: str) -> str:
    """The Optuna storage URL: a new optuna.db in this sweep dir, or an earlier study's when resuming.

    resume false -> `<sweep dir>/optuna.db`; true -> the newest optuna.db among the sibling sweep dirs (the earlier
    searches of this run name); a path -> that optuna.db, or the one in that sweep dir. The monitor and its mode
    are recorded beside a new study (optuna_monitor.json), and a resume that optimizes another one is refused.
    """
    here = Path(sweep_dir)
    if resume is None or resume is False:
        here.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
        write_json(here / STUDY_MONITOR_FILE, {"monitor": str(monitor), "monitor_mode": str(mode)})
        return f"sqlite:///{here / STUDY_FILE}"
    if resume is True:
        earlier = sorted(p for p in here.parent.glob(f"*/{STUDY_FILE}") if p.parent != here)
        if not earlier:
            raise ConfigError(
                f"hparams_search.resume=true found no {STUDY_FILE} under {here.parent}/*/. Expected an earlier "
                "`python train.py -m hparams_search=optuna` run with the same name. Fix: run once without "
                "hparams_search.resume, or pass hparams_search.resume=/path/to/optuna.db."
            )
        study = earlier[-1]
    else:
        path = Path(str(resume)).expanduser().resolve()
        study = path / STUDY_FILE if path.is_dir() else path
        if not study.is_file():
            raise ConfigError(
                f"hparams_search.resume={resume}: {study} does not exist. Expected an Optuna study file written by "
                f"an earlier search (<sweep dir>/{STUDY_FILE}) or its sweep dir. Fix: pass an existing path, or "
                "hparams_search.resume=true for the newest study of this run name."
            )
    _check_study_monitor(study, str(monitor), str(mode))
    return f"sqlite:///{study}"


def _check_study_monitor(study: Path, monitor: str, mode: str) -> None:
    """A study's trials are values of one monitor, in one direction: resuming it with another would mix them."""
    record = study.parent / STUDY_MONITOR_FILE
    if not record.is_file():  # a study written before the monitor was recorded: nothing to compare
        return
    recorded = read_json(record)
    if (recorded.get("monitor"), recorded.get("monitor_mode")) != (monitor, mode):
        raise ConfigError(
            f"hparams_search.resume: the study {study} optimizes monitor={recorded.get('monitor')} "
            f"(monitor_mode={recorded.get('monitor_mode')}), but this search has monitor={monitor} "
            f"(monitor_mode={mode}); its trials' values would be compared with values of another metric. "
            f"Fix: resume with monitor={recorded.get('monitor')} monitor_mode={recorded.get('monitor_mode')}, or "
            "start a new study without hparams_search.resume."
        )


def stdout_isatty() -> bool:
    """Whether stdout is a terminal: a live progress bar helps there, and wraps into noise in a log file or pipe."""
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty())


def register_resolvers() -> None:
    """Make the configs' resolvers available: run_id (one per process), abspath, cpu_precision, study_storage, ...

    Also registers the schemas that type data.* and model.* while composing (utils/schemas.py).
    """
    register_schemas()
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", _run_id, use_cache=True)
    if not OmegaConf.has_resolver("abspath"):
        OmegaConf.register_new_resolver("abspath", lambda path: os.path.abspath(os.path.expanduser(path)))
    if not OmegaConf.has_resolver("cpu_precision"):  # conf/trainer/cpu.yaml
        OmegaConf.register_new_resolver("cpu_precision", cpu_precision)
    if not OmegaConf.has_resolver("study_storage"):  # conf/hparams_search/optuna.yaml
        OmegaConf.register_new_resolver("study_storage", study_storage)
    if not OmegaConf.has_resolver("stdout_isatty"):  # conf/trainer/default.yaml: a progress bar only in a terminal
        OmegaConf.register_new_resolver("stdout_isatty", stdout_isatty)


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
    write_json(path, {"status": "failed", "error": f"{type(error).__name__}: {error}"})


def launch(script: str, config_name: str, task: str) -> None:
    """Run `task` ("module:function") as the Hydra app of the entry `script`, on conf/<config_name>.yaml beside it.

    The task's module is imported only once Hydra has composed the config, so a typo is reported at once (with
    the valid key that was probably meant) instead of after Lightning has loaded.
    """
    register_resolvers()
    config_dir = Path(script).resolve().parent / "conf"
    module_name, _, function_name = task.partition(":")

    @hydra.main(version_base="1.3", config_path=str(config_dir), config_name=config_name)
    def main(cfg: DictConfig) -> float | None:
        return run_task(getattr(importlib.import_module(module_name), function_name), cfg)

    try:
        with_config_hints(main, config_dir=config_dir, config_name=config_name)
    except SystemExit as stop:
        if stop.code is not None and not isinstance(stop.code, int):
            raise  # a message as the code: Python prints it and exits 1
        exit_without_teardown(stop.code or 0)
    exit_without_teardown(0)


def run_task(task: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig) -> float | None:
    """Run a task; print user mistakes as one paragraph (full trace with HYDRA_FULL_ERROR=1).

    In a multirun a failed job is recorded and the sweep goes on (unless `sweep.fail_fast=true`); the return value
    is the monitored metric, which sweepers such as Optuna optimize. None marks a failed trial: Optuna's sweeper
    records it as failed and goes on, while a NaN would make the sweeper itself crash.
    """
    # Here, not at the top: importing Lightning takes seconds, and the entry scripts import this module first.
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from retrain.callbacks.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE

    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    fail_fast = bool(OmegaConf.select(cfg, "sweep.fail_fast", default=False))
    try:
        check_types(cfg)  # a wrong type fails here, before the task reads any data
        with sweep_job():
            results = task(cfg)
    except SIGTERMException:  # Lightning stopped on SIGTERM where no task handles it (eval, predict, lr_find...)
        log.warning("Stopped on SIGTERM before %s finished; its results were not written.", task.__name__)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None  # a SystemExit without a code would exit 0: "finished"
    except KeyboardInterrupt:  # Ctrl-C where no task handles it (before train's fit, in predict): no traceback
        log.warning("Stopped on Ctrl-C before %s finished; its results were not written.", task.__name__)
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    except Exception as error:
        if HydraConfig.initialized():
            write_failure(error)
        if is_multirun():
            if fail_fast:
                raise  # Hydra marks the job failed, and the sweeper (with SweepSummary's help) stops the sweep
            log.exception("job failed; the sweep goes on (sweep.fail_fast=true stops it)")
            return None
        if full_error or not isinstance(error, RetrainError):
            raise
        print(f"\nerror: {error}\n(set HYDRA_FULL_ERROR=1 for the full traceback)", file=sys.stderr)
        sys.exit(1)
    value = results.get("monitor_value")
    return None if value is None or not math.isfinite(value) else float(value)


@contextlib.contextmanager
def sweep_job() -> Iterator[None]:
    """In a multirun, point DDP's re-launched ranks at this job, and keep the job from leaking into the next."""
    if not is_multirun():
        yield
        return
    argv, environ = list(sys.argv), dict(os.environ)
    hydra_cfg = HydraConfig.get()
    # Lightning's DDP re-runs sys.argv for the other ranks with `hydra.run.dir=<HydraConfig run.dir>` appended:
    # give them this job's overrides (not the whole sweep) and this job's folder (not an unused single-run one).
    # hydra.mode=RUN: a config that makes itself a sweep (experiment=cv, hparams_search=optuna) must not sweep again.
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task, "hydra.mode=RUN"]
    with read_write(cast(DictConfig, hydra_cfg.run)):  # HydraConfig is read-only
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        # The DDP launcher leaves LOCAL_RANK, WORLD_SIZE, MASTER_PORT... in os.environ; the next job would take
        # them for an external launcher's and wait forever for ranks that are never started.
        sys.argv = argv
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)

"""run_task: how a task's end reaches the shell (exit codes a scheduler or a `&&` chain acts on)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from clitools import composed
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from retrain.callbacks.preemption import PREEMPTED_EXIT_CODE
from retrain.errors import DataError
from retrain.utils.hydra import run_task, sweep_job


def evaluate_until_sigterm(cfg: DictConfig) -> dict[str, Any]:
    raise SIGTERMException  # what Lightning's loops raise between batches after a SIGTERM


def fail_on_data(cfg: DictConfig) -> dict[str, Any]:
    raise DataError("data.root has no class folders. Fix: point it at DIR/<class>/*.")


def test_a_sigterm_stop_in_any_task_exits_143_not_0(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # SIGTERMException is a SystemExit without a code: left alone, the process would exit 0 as if it had finished.
    with pytest.raises(SystemExit) as stopped:
        run_task(evaluate_until_sigterm, composed(tmp_path))
    assert stopped.value.code == PREEMPTED_EXIT_CODE == 143
    assert "Stopped on SIGTERM before evaluate_until_sigterm finished" in caplog.text


def test_a_user_mistake_exits_1_with_one_paragraph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as failed:
        run_task(fail_on_data, composed(tmp_path))
    assert failed.value.code == 1
    assert "error: data.root has no class folders. Fix:" in capsys.readouterr().err


def press_ctrl_c(cfg: DictConfig) -> dict[str, Any]:
    raise KeyboardInterrupt  # Ctrl-C outside train's fit-to-publish span (scanning the data, predict...)


def test_ctrl_c_in_any_task_exits_130_with_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        run_task(press_ctrl_c, composed(tmp_path))
    assert stopped.value.code == 130
    assert "Stopped on Ctrl-C before press_ctrl_c finished" in caplog.text


def test_the_ddp_ranks_of_a_sweep_job_run_that_job_not_the_sweep_again(tmp_path: Path) -> None:
    composed(tmp_path, "experiment=cv")  # a config that is a sweep by itself (hydra.mode: MULTIRUN)
    with sweep_job():  # what Lightning re-runs for the other ranks, before it appends hydra.run.dir
        assert sys.argv[1:] == [*HydraConfig.get().overrides.task, "hydra.mode=RUN"]

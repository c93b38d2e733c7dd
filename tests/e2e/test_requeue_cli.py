"""A job of `hydra/launcher=submitit_local` (the SLURM launcher's code path, as local processes) that gets submitit's
requeue signal mid-epoch saves last.ckpt, is requeued by submitit, and the requeued job resumes from it in the same
folder: one run, every step once. What SLURM adds (`scontrol requeue`, preemption by SIGTERM) is not tested here.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from clitools import FAST, assert_ok, run_cli

pytestmark = pytest.mark.e2e


def test_a_job_requeued_by_submitit_resumes_mid_epoch_in_its_own_folder(tmp_path: Path, imagefolder: Path) -> None:
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    marker = tmp_path / "signalled"
    result = run_cli(
        "train.py",
        "-m",
        "hydra/launcher=submitit_local",
        f"data.root={imagefolder}",
        *FAST,
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1",
        "test=false",
        "save.publish=false",
        "~callbacks.report",
        "+callbacks.requeue._target_=fault_injection.SignalOnce",
        "+callbacks.requeue.step=4",  # epoch 1, batch 0 of 3
        "+callbacks.requeue.signal=USR2",
        f"+callbacks.requeue.marker={marker}",
        cwd=tmp_path,
        env={"PYTHONPATH": path},
    )
    assert_ok(result)
    assert marker.exists()
    (job,) = (tmp_path / "logs" / "train" / "multiruns" / "resnet18").glob("*/0")
    submitit_logs = "".join(p.read_text() for p in job.parent.glob(".submitit/*/*.err"))
    assert "Caught signal SIGUSR2" in submitit_logs  # submitit's handler ran: after ours saved last.ckpt
    log = (job / "train.log").read_text()
    assert "Stopped on SIGUSR2 in fit at epoch 1, step 4" in log
    assert "resuming from it" in log  # the requeued start found the job's own last.ckpt
    results = json.loads((job / "results.json").read_text())
    assert results["status"] == "ok" and results["global_step"] == 6
    assert [row["epoch"] for row in results["history"]] == [0, 1]
    with (job / "csv" / "metrics.csv").open(newline="") as file:
        steps = [int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss_step")]
    assert steps == list(range(6))

"""Exact resume from anywhere in an epoch: a run stopped by SIGTERM after any step and resumed from the checkpoint
it saved there ends with the weights, optimizer state and metric history of the run that never stopped.

On the CPU with trainer.deterministic=true, default augmentation, MixUp/CutMix and two loader workers. The run is
stopped twice in the same epoch: right after a progressive-unfreezing milestone (the first step of epoch 1, where
every stage starts to train) and one step later, resumed each time. The train task runs in-process (32 px images,
3 steps an epoch). And a job requeued by its scheduler (submitit's signal), or resumed with `ckpt_path=last`, goes
on in the run's own folder: one metrics.csv, one results.json.
"""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from clitools import FAST, composed, make_imagefolder

import retrain.tasks.common as common
import retrain.tasks.train as train_task
from retrain.callbacks.preemption import PREEMPTED_EXIT_CODE, requeue_signal
from retrain.model.module import EPOCH_STATE_KEY
from retrain.model.resnet import STAGES
from retrain.tasks.train import train
from retrain.utils.hydra import run_task

SETTINGS = (
    *FAST,
    "trainer.max_epochs=3",
    "trainer.deterministic=true",
    "data.num_workers=2",  # after FAST's 0: worker processes augment and mix, as in real runs
    "data.mixup_alpha=0.2",
    "data.cutmix_alpha=1.0",
    "callbacks=unfreeze",
    "callbacks.unfreeze.schedule=[0:fc,1:all]",  # the milestone: every stage trains from epoch 1 on
    "model.bn_stats=frozen",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "test=false",
    "save.publish=false",
    "~callbacks.report",
)


class StopAfterStep(L.Callback):
    """Sends this process SIGTERM (or another signal), as a scheduler would, when the given optimizer step has run."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step = step
        self.signum = signum

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Signal once the run reaches `step`."""
        if trainer.global_step == self.step:
            signal.raise_signal(self.signum)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 8 train images each: 3 batches of 8 an epoch."""
    return make_imagefolder(tmp_path_factory.mktemp("midepoch") / "images", per_class=8)


def run(
    where: Path,
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    *overrides: str,
    stop_after: int | None = None,
    stop_signal: int = signal.SIGTERM,
    exit_code: int = PREEMPTED_EXIT_CODE,
) -> Path:
    """Train in `where` (stopped by `stop_signal` after step `stop_after`, exiting `exit_code`); its last.ckpt."""
    make_callbacks = common.make_callbacks  # the original, not an earlier run's patch
    extra = [StopAfterStep(stop_after, stop_signal)] if stop_after is not None else []
    monkeypatch.setattr(train_task, "make_callbacks", lambda cfg: [*make_callbacks(cfg), *extra])
    where.mkdir(parents=True, exist_ok=True)
    cfg = composed(where, f"data.root={folder}", *SETTINGS, *overrides)
    if stop_after is None:
        assert train(cfg)["status"] == "ok"
    else:
        with pytest.raises(SystemExit) as stopped:
            run_task(train, cfg)
        assert stopped.value.code == exit_code
    return where / "run" / "checkpoints" / "last.ckpt"


def load(path: Path) -> dict[str, Any]:
    """A checkpoint as resume reads it: tensors and plain data only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def test_stopped_twice_mid_epoch_right_after_unfreezing_the_run_ends_bit_identical(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> None:
    expected = load(run(tmp_path / "straight", folder, monkeypatch))

    first_stop = run(tmp_path / "a", folder, monkeypatch, stop_after=4)  # epoch 1's first step: all stages train
    stopped = load(first_stop)
    assert (stopped["epoch"], stopped["global_step"]) == (1, 4)
    assert stopped["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # the loader's position and random state
    assert EPOCH_STATE_KEY in stopped  # and epoch 1's train metrics so far
    assert stopped["callbacks"]["ProgressiveUnfreeze"]["trainable"] == list(STAGES)

    second_stop = run(tmp_path / "b", folder, monkeypatch, f"ckpt_path={first_stop}", stop_after=5)
    got = load(run(tmp_path / "c", folder, monkeypatch, f"ckpt_path={second_stop}"))
    lost_order = [w for w in recwarn if "dataloader is not resumable" in str(w.message)]
    assert lost_order == []  # Lightning's warning that the order of the epoch's remaining batches is lost

    assert (got["epoch"], got["global_step"]) == (expected["epoch"], expected["global_step"]) == (2, 9)
    differ = [k for k, v in expected["state_dict"].items() if not torch.equal(v, got["state_dict"][k])]
    assert differ == [], f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"
    momentum, resumed = expected["optimizer_states"][0]["state"], got["optimizer_states"][0]["state"]
    assert momentum.keys() == resumed.keys()
    assert all(torch.equal(momentum[k]["momentum_buffer"], resumed[k]["momentum_buffer"]) for k in momentum)
    assert got["retrain"]["history"] == expected["retrain"]["history"]  # train and val metrics of every epoch
    assert [row["epoch"] for row in got["retrain"]["history"]] == [0, 1, 2]


def test_a_requeued_job_and_ckpt_path_last_go_on_in_the_run_folder_it_started_in(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logs = tmp_path / "logs"
    runs = logs / "train" / "runs" / "resnet18"  # where ckpt_path=last looks; the job's own folder: runs/run
    run_dir = runs / "run"
    same = (f"paths.log_dir={logs}", "trainer.max_epochs=2", "trainer.log_every_n_steps=1", "data.num_workers=0")

    handed_over: list[tuple[int, str]] = []

    def submitit_requeue(signum: int, frame: Any) -> None:
        """What submitit installs for its signal: requeue the job, then exit with the local requeue code."""
        checkpoint = load(run_dir / "checkpoints" / "last.ckpt")
        handed_over.append((checkpoint["global_step"], json.loads((run_dir / "results.json").read_text())["status"]))
        raise SystemExit(3)

    previous = signal.signal(requeue_signal(), submitit_requeue)
    try:
        run(runs, folder, monkeypatch, *same, stop_after=2, stop_signal=requeue_signal(), exit_code=3)
    finally:
        signal.signal(requeue_signal(), previous)
    assert handed_over == [(2, "preempted")]  # after last.ckpt and results.json were written

    # The requeued job: the same command in the same folder resumes from its last.ckpt; SIGTERM stops it again.
    run(runs, folder, monkeypatch, *same, stop_after=4)
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4
    session = tmp_path / "second"
    run(session, folder, monkeypatch, *same, "ckpt_path=last")

    assert (session / "run" / "continued_in.txt").read_text().strip() == str(run_dir)
    assert not (session / "run" / "checkpoints").exists() and not (session / "run" / "csv").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]  # no last-v1
    with (run_dir / "csv" / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    steps = [int(row["step"]) for row in rows if row.get("train/loss_step")]
    assert steps == list(range(6))  # every step once: the rows logged after each checkpoint were not doubled
    assert sorted(int(float(row["epoch"])) for row in rows if row.get("val/acc")) == [0, 1]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "ok" and results["run_dir"] == str(run_dir)
    assert [row["epoch"] for row in results["history"]] == [0, 1]

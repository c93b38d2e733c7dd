"""Exact resume on the CPU: a run interrupted and resumed ends bit-identical to the run that never stopped.

With `trainer.deterministic=true`, default augmentation, MixUp/CutMix and a loader worker: the RNGs are seeded from
(seed, epoch) at each epoch start, and the worker restarts each epoch so its RNG follows that seed too.
Single process, from an end-of-epoch checkpoint right after a progressive-unfreezing milestone: the periodic
checkpoint taken after epoch 2 of the same 4-epoch run (a run planned for 3 epochs would differ on purpose, as its
cosine schedule, T_max = max_epochs, decays over 3), resumed to unfreeze layer3 in epoch 3 as the straight run did.
DDP on 2 CPU processes, stopped by SIGTERM in the middle of an epoch and resumed with `ckpt_path=last`,
with data.sampler=balanced and class weights: each rank's loader position and random state travel in rank 0's
checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from clitools import FAST, assert_ok, run_cli

pytestmark = pytest.mark.e2e

SETTINGS = (
    "trainer.deterministic=true",
    "data.num_workers=1",  # after FAST's 0: a worker process augments, as in real runs
    "data.mixup_alpha=0.2",  # and blends batches: MixUp or CutMix, drawn in the worker too
    "data.cutmix_alpha=1.0",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "test=false",
    "save.publish=false",
    "~callbacks.report",
)
EPOCH_END = (
    "trainer.max_epochs=4",
    "callbacks.checkpoint_periodic.every_n_epochs=1",
    "trainer.limit_train_batches=2",
    "callbacks=unfreeze",
    "callbacks.unfreeze.schedule=[0:fc,2:layer4,3:layer3]",
)
DDP_BALANCED = (
    "trainer=ddp_cpu",
    "trainer.devices=2",
    "trainer.max_epochs=2",
    "data.batch_size=4",  # 12 train images a rank: 3 steps an epoch
    "data.sampler=balanced",  # its draw is seeded from (seed, epoch) as the shuffle is
    "model.class_weights=balanced",
)


def final_state(run_dir: Path) -> dict:
    """The weights, optimizer state and step of a run's last.ckpt."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {key: checkpoint[key] for key in ("state_dict", "optimizer_states", "global_step", "epoch")}


def assert_same_training(expected: dict, got: dict) -> None:
    """Same epoch and step, bit-identical weights and SGD momentum."""
    assert (got["epoch"], got["global_step"]) == (expected["epoch"], expected["global_step"])
    assert got["state_dict"].keys() == expected["state_dict"].keys()
    differ = [k for k, v in expected["state_dict"].items() if not torch.equal(v, got["state_dict"][k])]
    assert differ == [], f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"
    momentum, resumed = expected["optimizer_states"][0]["state"], got["optimizer_states"][0]["state"]
    assert momentum.keys() == resumed.keys()
    assert all(torch.equal(momentum[k]["momentum_buffer"], resumed[k]["momentum_buffer"]) for k in momentum)


def test_resume_after_an_unfreeze_milestone_matches_the_uninterrupted_run_bit_for_bit(
    tmp_path: Path, imagefolder: Path
) -> None:
    data = f"data.root={imagefolder}"
    straight = run_cli("train.py", data, *FAST, *SETTINGS, *EPOCH_END, cwd=tmp_path)
    assert_ok(straight)
    (stopped,) = (straight.runs()[-1] / "checkpoints" / "periodic").glob("*-epoch002.ckpt")  # layer4 trained in it
    resumed = run_cli("train.py", data, *FAST, *SETTINGS, *EPOCH_END, f"ckpt_path={stopped}", cwd=tmp_path)
    assert_ok(resumed)
    assert "persistent_workers=false" in straight.output
    expected, got = final_state(straight.runs()[0]), final_state(resumed.runs()[-1])
    assert_same_training(expected, got)
    layer3 = "model.layer3.0.conv1.weight"
    mid = torch.load(stopped, map_location="cpu", weights_only=True)
    assert not torch.equal(mid["state_dict"][layer3], got["state_dict"][layer3])  # epoch 3, after the resume
    groups = [[(g["name"], g["lr"]) for g in s["optimizer_states"][0]["param_groups"]] for s in (expected, got)]
    assert groups[0] == groups[1]
    unfreeze = resumed.results()["unfreeze"]
    assert [row["trainable"] for row in unfreeze["history"]] == [
        ["fc"],
        ["fc"],
        ["layer4", "fc"],
        ["layer3", "layer4", "fc"],
    ]
    assert resumed.results()["metadata"]["freeze"] == ["stem", "layer1", "layer2"]


def test_ddp_run_stopped_mid_epoch_by_sigterm_resumes_bit_identical(tmp_path: Path, imagefolder: Path) -> None:
    ddp = (f"data.root={imagefolder}", *FAST, *SETTINGS, *DDP_BALANCED)
    (tmp_path / "straight").mkdir()  # its own logs/: `ckpt_path=last` below finds the stopped run's last.ckpt
    straight = run_cli("train.py", *ddp, cwd=tmp_path / "straight", timeout=400)
    assert_ok(straight)

    # SIGTERM to rank 0 alone, as `kill <pid>` of the launching process: the ranks agree after every step to stop.
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    signal_rank_0 = (
        "+callbacks.stop._target_=fault_injection.SignalOnce",
        "+callbacks.stop.step=4",  # epoch 1, batch 0 of 3
        "+callbacks.stop.signal=TERM",
        f"+callbacks.stop.marker={tmp_path / 'signalled'}",
        "+callbacks.stop.rank=0",
    )
    stopped = run_cli("train.py", *ddp, *signal_rank_0, cwd=tmp_path, env={"PYTHONPATH": path}, timeout=400)
    assert stopped.returncode == 143, stopped.output[-6000:]
    (run_dir,) = stopped.runs()
    assert json.loads((run_dir / "results.json").read_text())["status"] == "preempted"
    at_stop = final_state(run_dir)
    # Sent after the ranks agreed on step 4 (this callback runs last), the stop lands after step 5: mid-epoch.
    assert (at_stop["epoch"], at_stop["global_step"]) == (1, 5)

    resumed = run_cli("train.py", *ddp, "ckpt_path=last", cwd=tmp_path, timeout=400)
    assert_ok(resumed)
    assert "goes on in a fresh order" not in resumed.output  # each rank resumed its own loader position
    expected, got = final_state(straight.runs()[0]), final_state(run_dir)
    assert_same_training(expected, got)
    history = json.loads((straight.runs()[0] / "results.json").read_text())["history"]
    assert resumed.results()["history"] == history  # train and val metrics of every epoch
    assert [row["epoch"] for row in history] == [0, 1]

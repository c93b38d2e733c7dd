"""Exact resume on the CPU: interrupted after epoch 2 and resumed, a run ends with bit-identical weights.

With `trainer.deterministic=true`, default augmentation, MixUp/CutMix and a loader worker: the RNGs are seeded from
(seed, epoch) at each epoch start, and the worker restarts each epoch so its RNG follows that seed too. Again with
data.sampler=balanced (and class weights), whose draw of each epoch is seeded from (seed, epoch) as well.
The interruption point is the periodic checkpoint taken after epoch 2 of the same 4-epoch run: a run planned
for 2 epochs would differ on purpose, as its cosine schedule (T_max = max_epochs) decays over 2 epochs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clitools import FAST, assert_ok, run_cli

pytestmark = pytest.mark.e2e

SETTINGS = (
    "trainer.max_epochs=4",
    "trainer.deterministic=true",
    "data.num_workers=1",  # after FAST's 0: a worker process augments, as in real runs
    "data.mixup_alpha=0.2",  # and blends batches: MixUp or CutMix, drawn in the worker too
    "data.cutmix_alpha=1.0",
    "callbacks.checkpoint_periodic.every_n_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "test=false",
    "save.publish=false",
    "~callbacks.report",
)


def final_state(run_dir: Path) -> dict:
    """The weights, optimizer state and step of a run's last.ckpt."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {key: checkpoint[key] for key in ("state_dict", "optimizer_states", "global_step", "epoch")}


@pytest.mark.parametrize(
    "balance",
    [(), ("data.sampler=balanced", "model.class_weights=balanced")],
    ids=["shuffle", "balanced"],  # the balanced draw is seeded from (seed, epoch) as the shuffle is
)
def test_resume_after_epoch_2_matches_the_uninterrupted_run_bit_for_bit(
    tmp_path: Path, imagefolder: Path, balance: tuple[str, ...]
) -> None:
    data = f"data.root={imagefolder}"
    straight = run_cli("train.py", data, *FAST, *SETTINGS, *balance, cwd=tmp_path)
    assert_ok(straight)
    (after_two,) = (straight.runs()[-1] / "checkpoints" / "periodic").glob("*-epoch001.ckpt")
    resumed = run_cli("train.py", data, *FAST, *SETTINGS, *balance, f"ckpt_path={after_two}", cwd=tmp_path)
    assert_ok(resumed)
    assert "persistent_workers=false" in straight.output

    expected, got = final_state(straight.runs()[0]), final_state(resumed.runs()[-1])
    assert (got["epoch"], got["global_step"]) == (expected["epoch"], expected["global_step"])
    assert got["state_dict"].keys() == expected["state_dict"].keys()
    differ = [k for k, v in expected["state_dict"].items() if not torch.equal(v, got["state_dict"][k])]
    assert differ == [], f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"
    momentum = [s["momentum_buffer"] for s in expected["optimizer_states"][0]["state"].values()]
    resumed_momentum = [s["momentum_buffer"] for s in got["optimizer_states"][0]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, resumed_momentum, strict=True))

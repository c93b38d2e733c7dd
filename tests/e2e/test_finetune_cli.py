"""Transfer learning through the CLI: DDP with late-unfrozen stages, LR finder (exact resume after an unfreeze:
test_resume_exact_cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clitools import FAST, CliResult, assert_ok, run_cli

from retrain.tuning import lr_set_by_user

pytestmark = pytest.mark.e2e
QUICK = (*FAST, "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false", "save.publish=false")
# One checkpoint per epoch: Lightning refreshes last.ckpt only in epochs that save a top-k one, and on tiny data the
# monitored accuracy often ties.
EVERY_EPOCH = "callbacks.checkpoint.save_top_k=-1"


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _train(cwd: Path, imagefolder: Path, *overrides: str, timeout: int = 300) -> CliResult:
    """Run train.py on the test images with the FAST settings and no publishing, and require it to succeed."""
    result = run_cli(
        "train.py", f"data.root={imagefolder}", *overrides, *FAST, "save.publish=false", cwd=cwd, timeout=timeout
    )
    assert_ok(result)
    return result


def _epoch(result, epoch: int) -> Path:
    """The checkpoint taken after `epoch` in the newest run."""
    return next((result.runs()[-1] / "checkpoints").glob(f"*-epoch{epoch:03d}-*.ckpt"))


def test_ddp_ranks_agree_after_a_stage_unfreezes_mid_run(tmp_path: Path, imagefolder: Path) -> None:
    result = _train(
        tmp_path,
        imagefolder,
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "callbacks=unfreeze",
        "callbacks.unfreeze.schedule=[0:fc,1:layer4]",
        EVERY_EPOCH,
        "test=false",
        timeout=400,
    )
    checksums = result.results()["unfreeze"]["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    epoch0, final = _ckpt(_epoch(result, 0))["state_dict"], _ckpt(_epoch(result, 1))["state_dict"]
    assert not torch.equal(epoch0["model.layer4.1.conv2.weight"], final["model.layer4.1.conv2.weight"])
    for key in ("model.conv1.weight", "model.bn1.running_mean", "model.layer3.1.bn2.running_var"):
        assert torch.equal(epoch0[key], final[key]), f"{key} changed although its stage stayed frozen"


def test_lr_finder_picks_the_lr_and_the_feature_cache_serves_every_split(tmp_path: Path, imagefolder: Path) -> None:
    result = _train(
        tmp_path,
        imagefolder,
        "model.freeze=true",
        "data.augment=none",
        "tune.lr_find=true",
        "tune.num_training=30",
        "trainer.max_epochs=2",
    )
    results = result.results()
    found = results["lr_find"]
    assert found["applied"] and found["lr"] == found["suggestion"] > 0
    assert Path(found["plot"]).is_file() and Path(found["plot"]).parent == result.runs()[-1]
    assert not list(result.runs()[-1].glob(".lr_find*.ckpt"))  # Lightning's temporary checkpoint is gone
    cache = results["feature_cache"]
    assert cache["enabled"] and set(cache["splits"]) == {"train", "val", "test"}
    assert all(split["builds"] == 1 for split in cache["splits"].values())
    assert results["test"]["test/acc"] >= 0.0 and results["metadata"]["train_bn"] is False
    saved = json.loads((result.runs()[-1] / "lr_find.json").read_text())
    assert saved["lr"] == found["lr"]


def test_an_lr_on_the_command_line_is_kept() -> None:
    assert lr_set_by_user(["data.root=x", "model.lr=0.05"])
    assert lr_set_by_user(["++model.lr=0.05"])
    assert not lr_set_by_user(["model.lr_find=1", "tune.lr_find=true", "experiment=retrain"])

"""callbacks=ema: the weights that are validated, checkpointed, tested and published are the moving average."""

from __future__ import annotations

from pathlib import Path

import torch
from clitools import FAST, composed

from retrain.artifacts.formats import read_artifact
from retrain.tasks.train import train

# A constant LR: a cosine schedule planned for 2 epochs would train the resumed third one at LR 0.
RUN = ("callbacks=ema", "callbacks.ema.decay=0.5", "trainer.max_epochs=2", "model.lr=0.05", "model/scheduler=none")


def test_ema_weights_are_what_is_checkpointed_and_published(tmp_path: Path, imagefolder: Path) -> None:
    results = train(composed(tmp_path, f"data.root={imagefolder}", *FAST, *RUN))
    checkpoint = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=True)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert not torch.equal(averaged["model.conv1.weight"], raw["model.conv1.weight"])  # two sets of weights
    published = Path(results["registry"]["path"])
    weights = torch.load(published / "weights.pth", map_location="cpu", weights_only=True)
    for key, value in weights.items():
        assert torch.equal(value, averaged[f"model.{key}"]), key
    assert read_artifact(published / "model.safetensors").metadata["config"]["callbacks"]["ema"]["decay"] == 0.5


def test_a_run_resumed_with_ema_continues_the_raw_and_the_averaged_weights(tmp_path: Path, imagefolder: Path) -> None:
    first = train(composed(tmp_path, f"data.root={imagefolder}", *FAST, *RUN, "name=ema"))
    last = Path(first["last_checkpoint"])
    before = torch.load(last, map_location="cpu", weights_only=True)  # the resumed run rewrites last.ckpt
    more = ("trainer.max_epochs=3", f"ckpt_path={last}")
    resumed = train(composed(tmp_path, f"data.root={imagefolder}", *FAST, *RUN, "name=ema", *more))
    after = torch.load(resumed["last_checkpoint"], map_location="cpu", weights_only=True)
    assert (before["global_step"], after["global_step"]) == (6, 9)  # 3 steps per epoch, one more epoch
    for weights in ("current_model_state", "state_dict"):  # both sets moved on from where they were
        assert not torch.equal(after[weights]["model.fc.weight"], before[weights]["model.fc.weight"])

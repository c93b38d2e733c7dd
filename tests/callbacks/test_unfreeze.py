"""Progressive unfreezing: schedule parsing, the presets, and what a fit does to frozen and unfrozen stages."""

from __future__ import annotations

import csv
import doctest
import logging
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from clitools import REPO
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import retrain.callbacks.unfreeze as unfreeze_module
from retrain.callbacks.unfreeze import ProgressiveUnfreeze, parse_schedule
from retrain.errors import ConfigError
from retrain.model.module import ClassifierModule
from retrain.model.resnet import STAGES, build_resnet, stage_of
from retrain.utils.hydra import register_resolvers

ALL = list(STAGES)


# --- the schedule ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "freeze_epochs", "expected"),
    [
        (
            ["0:fc", "2:layer4", "4:layer3+layer2", "6:all"],
            None,
            {0: ["fc"], 2: ["layer4"], 4: ["layer2", "layer3"], 6: ALL},
        ),
        ({0: ["fc"], "3": "all"}, None, {0: ["fc"], 3: ALL}),
        ({0: "fc,layer4"}, None, {0: ["layer4", "fc"]}),
        (None, 2, {0: ["fc"], 2: ALL}),
        (["0:fc"], 5, {0: ["fc"]}),  # a schedule wins over freeze_epochs
    ],
)
def test_schedule_forms(schedule: object, freeze_epochs: int | None, expected: dict[int, list[str]]) -> None:
    assert parse_schedule(schedule, freeze_epochs) == expected


@pytest.mark.parametrize(
    ("schedule", "freeze_epochs", "message"),
    [
        (["2:layer4"], None, "epoch 0"),
        (["0:fc", "1:layer5"], None, "'layer5'"),
        (["0:fc", "0:layer4"], None, "appears twice"),
        (["fc"], None, "has no `:`"),
        (["-1:fc"], None, "not an epoch"),
        (None, None, "freeze_epochs"),
        (None, 0, "freeze_epochs"),
    ],
)
def test_bad_schedules_say_what_to_write(schedule: object, freeze_epochs: int | None, message: str) -> None:
    with pytest.raises(ConfigError, match=r"callbacks\.unfreeze") as error:
        parse_schedule(schedule, freeze_epochs)
    assert message in str(error.value)
    assert "callbacks.unfreeze.schedule=[0:fc," in str(error.value)


def test_frozen_sets_grow_with_the_epochs_and_the_documented_example_holds() -> None:
    cb = ProgressiveUnfreeze(["0:fc", "2:layer4", "4:layer3", "6:all"])
    assert [len(cb.frozen_at(epoch)) for epoch in range(8)] == [5, 5, 4, 4, 3, 3, 0, 0]
    assert cb.unfreezes_later()
    assert not ProgressiveUnfreeze(["0:fc"]).unfreezes_later()
    assert doctest.testmod(unfreeze_module).failed == 0


def test_model_freeze_may_only_repeat_the_schedules_epoch_zero() -> None:
    cb = ProgressiveUnfreeze(freeze_epochs=1)
    assert cb.initial_frozen([]) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert cb.initial_frozen(["stem", "layer1", "layer2", "layer3", "layer4"]) == cb.frozen_at(0)
    with pytest.raises(ConfigError, match=r"model.freeze=\['stem'\] and callbacks.unfreeze.schedule"):
        cb.initial_frozen(["stem"])


def test_resumed_state_keeps_the_trainable_set_and_warns_about_a_changed_schedule(caplog) -> None:
    first = ProgressiveUnfreeze(["0:fc", "2:layer4"])
    first.trainable = {"fc", "layer4"}
    state = first.state_dict()
    second = ProgressiveUnfreeze(["0:fc", "5:all"])
    with caplog.at_level(logging.WARNING, logger="retrain"):
        second.load_state_dict(state)
    assert second.trainable == {"fc", "layer4"}
    assert "differs from the checkpoint's" in caplog.text


def _compose(*overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=["data.root=/nowhere", *overrides])


def test_finetune_preset_is_fastai_fine_tune_and_retrain_lowers_the_lr() -> None:
    finetune = _compose("experiment=finetune", "callbacks.unfreeze.freeze_epochs=2")
    callback = instantiate(finetune.callbacks.unfreeze)
    assert callback.schedule == {0: ["fc"], 2: ALL}
    assert finetune.model.init_from == "IMAGENET1K_V1"
    assert finetune.model.stage_lr_mult == 0.5
    assert "lr_monitor" in finetune.callbacks  # the LR monitor still logs every group
    retrain = _compose("experiment=retrain", "name=pets")
    assert retrain.model.init_from == "pets@latest"
    assert retrain.model.lr < _compose().model.lr
    assert retrain.model.freeze is False and retrain.model.stage_lr_mult == 0.5
    assert "unfreeze" not in retrain.callbacks


# --- a fit -------------------------------------------------------------------------------------------------


def _loader(seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(24, 3, 32, 32, generator=generator)
    labels = torch.arange(24) % 3
    return DataLoader(TensorDataset(images, labels), batch_size=8)


def _fit(
    tmp_path: Path, *, train_bn: bool, schedule: list[str], epochs: int
) -> tuple[ClassifierModule, dict, L.Trainer]:
    torch.manual_seed(0)
    module = ClassifierModule(
        build_resnet("resnet18", 3),
        ["a", "b", "c"],
        optimizer=partial(torch.optim.SGD, momentum=0.9),
        lr=0.05,
        train_bn=train_bn,
    )
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=[ProgressiveUnfreeze(schedule), LearningRateMonitor(logging_interval="epoch")],
        logger=CSVLogger(tmp_path, name="csv", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=_loader(1), val_dataloaders=_loader(2))
    return module, before, trainer


def test_frozen_stages_stay_bit_identical_and_an_unfrozen_stage_trains(tmp_path: Path) -> None:
    module, before, trainer = _fit(tmp_path, train_bn=False, schedule=["0:fc", "1:layer4"], epochs=2)
    after = module.model.state_dict()
    for key, tensor in after.items():
        if stage_of(key) in ("stem", "layer1", "layer2", "layer3"):
            assert torch.equal(tensor, before[key]), f"{key} changed although its stage stayed frozen"
    assert not torch.equal(after["layer4.0.conv1.weight"], before["layer4.0.conv1.weight"])
    assert not torch.equal(after["layer4.0.bn1.running_mean"], before["layer4.0.bn1.running_mean"])
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    assert module.frozen == ["stem", "layer1", "layer2", "layer3"]
    # One group per stage, from the first step to the last: unfreezing never added a group.
    assert [group["name"] for group in trainer.optimizers[0].param_groups] == ALL
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    flags = [(row["epoch"], row["trainable/layer4"], row["trainable/fc"]) for row in rows if row["trainable/fc"]]
    assert flags == [("0", "0.0", "1.0"), ("1", "1.0", "1.0")]
    assert sum(1 for row in rows if row["lr-SGD/layer4"]) == 2  # the LR monitor logs every group, every epoch


def test_train_bn_lets_frozen_stages_batchnorm_learn(tmp_path: Path) -> None:
    module, before, _ = _fit(tmp_path, train_bn=True, schedule=["0:fc"], epochs=1)
    after = module.model.state_dict()
    assert torch.equal(after["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"])
    assert not torch.equal(after["layer1.0.bn1.running_mean"], before["layer1.0.bn1.running_mean"])
    assert not torch.equal(after["layer1.0.bn1.weight"], before["layer1.0.bn1.weight"])

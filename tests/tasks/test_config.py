"""The composed config builds the objects the README promises (optimizers, schedulers, metrics, presets)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from clitools import FAST, composed
from hydra.utils import instantiate

from retrain.model.module import ClassifierModule
from retrain.model.resnet import build_resnet
from retrain.tasks.train import train


def _optimizer(cfg) -> tuple[torch.optim.Optimizer, object]:
    module = ClassifierModule(
        build_resnet("resnet18", 5),
        list("abcde"),
        optimizer=instantiate(cfg.model.optimizer),
        scheduler=instantiate(cfg.model.scheduler) if cfg.model.get("scheduler") else None,
        lr=cfg.model.lr,
    )
    out = module.configure_optimizers()
    return (out["optimizer"], out["lr_scheduler"]["scheduler"]) if isinstance(out, dict) else (out, None)


def test_default_is_sgd_momentum_with_cosine_and_lr_from_model_lr(tmp_path: Path) -> None:
    optimizer, scheduler = _optimizer(composed(tmp_path, "model.lr=0.05"))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert [g["name"] for g in optimizer.param_groups] == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert {g["lr"] for g in optimizer.param_groups} == {0.05}


def test_adamw_and_step_are_config_choices(tmp_path: Path) -> None:
    optimizer, scheduler = _optimizer(composed(tmp_path, "model/optimizer=adamw", "model/scheduler=step"))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    optimizer, scheduler = _optimizer(composed(tmp_path, "model/scheduler=none"))
    assert scheduler is None


def test_top5_accuracy_only_with_five_or_more_classes() -> None:
    five = ClassifierModule(build_resnet("resnet18", 5), list("abcde"))
    three = ClassifierModule(build_resnet("resnet18", 3), list("abc"))
    assert "val/acc_top5" in five.val_metrics.keys(keep_base=False)
    assert "val/acc_top5" not in three.val_metrics.keys(keep_base=False)
    assert {"val/acc", "val/bal_acc", "val/f1"} == set(three.val_metrics.keys(keep_base=False))


def test_trainer_presets_compose(tmp_path: Path) -> None:
    assert composed(tmp_path, "trainer=ddp_cpu").trainer.strategy == "ddp"
    assert composed(tmp_path, "trainer=ddp_cpu").trainer.accelerator == "cpu"
    assert composed(tmp_path, "trainer=gpu", "trainer.precision=bf16-mixed").trainer.precision == "bf16-mixed"
    assert composed(tmp_path, "trainer=ddp").trainer.devices == 4


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(True, False, "bf16-mixed"), (False, True, "bf16-mixed"), (False, False, "32-true")],
)
def test_cpu_preset_uses_bf16_only_on_cpus_with_native_bf16(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, expected: str
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert composed(tmp_path, "trainer=cpu").trainer.precision == expected
    assert composed(tmp_path, "trainer=cpu", "trainer.precision=32").trainer.precision == 32  # the user decides


def test_label_smoothing_softens_the_training_loss_only(tmp_path: Path) -> None:
    cfg = composed(tmp_path, "model.label_smoothing=0.2")
    module = ClassifierModule(build_resnet("resnet18", 3), list("abc"), label_smoothing=cfg.model.label_smoothing)
    module.eval()  # BatchNorm on running stats: the same logits for both losses
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        loss = module.training_step((images, labels), 0)
        logits = module(images)
    assert torch.allclose(loss, F.cross_entropy(logits, labels, label_smoothing=0.2))
    assert not torch.allclose(loss, F.cross_entropy(logits, labels))
    assert torch.allclose(module.criterion(logits, labels), F.cross_entropy(logits, labels))  # val/test loss


def test_gradient_accumulation_and_clipping_are_trainer_settings(tmp_path: Path, imagefolder: Path) -> None:
    overrides = ("trainer.max_epochs=1", "trainer.accumulate_grad_batches=3", "trainer.gradient_clip_val=0.5")
    results = train(composed(tmp_path, f"data.root={imagefolder}", *FAST, *overrides, "save.publish=false"))
    assert results["global_step"] == 1  # 3 batches of 8 (drop_last), one optimizer step per 3

"""Pruning: masks that survive checkpoints and optimizer steps, plain state_dicts, and the sparsity reported."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision

from retrain.errors import ConfigError
from retrain.model.pruning import (
    make_permanent,
    prune_convolutions,
    prune_from_config,
    sparsity_by_stage,
    warn_if_pruning_is_lost,
)


def _net() -> torchvision.models.ResNet:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3)


def test_l1_pruning_reaches_the_amount_in_every_stage_and_spares_the_head() -> None:
    net = _net()
    info = prune_convolutions(net, 0.3, "l1_unstructured")
    assert info["method"] == "l1_unstructured" and info["amount"] == 0.3
    assert set(info["sparsity"]) == {"stem", "layer1", "layer2", "layer3", "layer4", "all"}
    assert all(v == pytest.approx(0.3, abs=0.005) for v in info["sparsity"].values())
    assert int((net.fc.weight == 0).sum()) == 0


def test_ln_structured_removes_whole_output_channels() -> None:
    net = _net()
    prune_convolutions(net, 0.25, "ln_structured")
    weight = net.layer2[0].conv1.weight
    zero_filters = (weight.flatten(1) == 0).all(dim=1)
    assert int(zero_filters.sum()) == round(0.25 * weight.shape[0])
    assert bool(((weight.flatten(1) == 0).any(dim=1) == zero_filters).all())  # zeros only in whole filters


def test_checkpoints_hold_plain_keys_and_loading_them_restores_the_masks() -> None:
    net = _net()
    prune_convolutions(net, 0.5, "l1_unstructured")
    state = net.state_dict()
    assert not [k for k in state if k.endswith(("_orig", "_mask"))]
    assert torchvision.models.resnet18(num_classes=3).load_state_dict(state)  # what any user does with it

    resumed = _net()  # other random weights, pruned again, then loaded from the checkpoint
    prune_convolutions(resumed, 0.5, "l1_unstructured")
    resumed.load_state_dict(state)
    assert torch.equal(resumed.layer1[0].conv1.weight_mask, net.layer1[0].conv1.weight_mask)

    optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1)
    resumed(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert sparsity_by_stage(resumed)["all"] == pytest.approx(0.5, abs=0.005)  # retraining keeps pruned weights at 0


def test_make_permanent_leaves_a_plain_resnet_with_the_same_outputs() -> None:
    net = _net().eval()
    prune_convolutions(net, 0.3, "ln_structured")
    images = torch.randn(2, 3, 32, 32)
    before = net(images)
    sparsity = make_permanent(net)
    assert sparsity["all"] == pytest.approx(0.3, abs=0.01)
    assert not any(name.endswith("_orig") for name, _ in net.named_parameters())
    assert torch.allclose(net(images), before)


def test_amount_zero_is_no_pruning_and_bad_settings_name_the_key() -> None:
    net = _net()
    assert prune_from_config(net, 0.0, "l1_unstructured") is None
    assert sparsity_by_stage(net)["all"] == 0.0
    with pytest.raises(ConfigError, match=r"model\.prune\.method='l2'.*ln_structured"):
        prune_from_config(net, 0.3, "l2")
    with pytest.raises(ConfigError, match=r"model\.prune\.amount=1\.5"):
        prune_from_config(net, 1.5, "l1_unstructured")


def test_training_a_pruned_model_again_without_model_prune_says_the_zeros_will_fill_in(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prune, then experiment=qat from it (as the docs prescribed): sparsity went from 0.30 to 0.19, in silence.
    parent = {"prune": {"method": "l1_unstructured", "amount": 0.3, "sparsity": {}}}
    with caplog.at_level(logging.WARNING, logger="retrain"):
        warn_if_pruning_is_lost(parent, "pruned@v001", qat=False)
        warn_if_pruning_is_lost({"prune": None}, "plain@v001", qat=False)
    assert "pruned@v001 was pruned (l1_unstructured, amount 0.3)" in caplog.text and "plain@v001" not in caplog.text
    assert "Fix: model.prune.amount=0.3 model.prune.method=l1_unstructured" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retrain"):
        warn_if_pruning_is_lost(parent, "pruned@v001", qat=True)
    assert (
        "the int8 model is not pruned" in caplog.text
        and "export.py ckpt_path=pruned@v001 formats=[int8]" in caplog.text
    )

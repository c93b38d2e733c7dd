"""Freezing, BatchNorm policy, parameter groups and checked weight loading, all without a Trainer."""

import re
from collections.abc import Iterable

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from retrain.errors import ArtifactError, ConfigError
from retrain.model.resnet import ARCHS, STAGES, build_resnet, stage_of
from retrain.model.surgery import (
    BACKBONE,
    apply_freeze,
    describe_state_dict,
    head_num_classes,
    load_weights,
    param_groups,
    parse_freeze,
    set_bn_mode,
)


def _model(num_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_resnet("resnet18", num_classes)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _meta_state_dict(arch: str, **kwargs: int) -> dict[str, torch.Tensor]:
    """A state_dict with real keys and shapes but no storage, for checks that never copy tensors."""
    with torch.device("meta"):
        return dict(getattr(torchvision.models, arch)(**kwargs).state_dict())


def _train(model: nn.Module, frozen: Iterable[str], *, train_bn: bool, steps: int = 3) -> None:
    """A few SGD steps on random 32-px images, following the module's train() -> set_bn_mode order."""
    frozen = list(frozen)
    optimizer = torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=1e-4, stage_lr_mult=0.5), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model.train()
        set_bn_mode(model, frozen, train_bn=train_bn)
        images = torch.randn(4, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 3, (4,), generator=generator)
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad()


# --- parse_freeze -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (True, list(BACKBONE)),
        ("all", list(BACKBONE)),
        (False, []),
        (None, []),
        ("none", []),
        ("", []),
        (["layer1", "stem"], ["stem", "layer1"]),
        (("layer4", "layer4"), ["layer4"]),
        ("stem, layer1", ["stem", "layer1"]),
        (OmegaConf.create(["layer2", "stem"]), ["stem", "layer2"]),
        (["fc"], ["fc"]),
    ],
)
def test_parse_freeze(spec: object, expected: list[str]) -> None:
    assert parse_freeze(spec) == expected


def test_freeze_true_leaves_the_head_trainable() -> None:
    assert "fc" not in parse_freeze(True)
    assert parse_freeze(True) == ["stem", "layer1", "layer2", "layer3", "layer4"]


def test_parse_freeze_unknown_stage_lists_valid_names_and_override() -> None:
    with pytest.raises(ConfigError) as info:
        parse_freeze(["stme", "layer1"])
    message = str(info.value)
    assert "'stme'" in message
    assert "stem, layer1, layer2, layer3, layer4, fc" in message
    assert "Did you mean 'stem'?" in message
    assert "`model.freeze=[stem,layer1]`" in message


def test_parse_freeze_rejects_other_types() -> None:
    with pytest.raises(ConfigError, match=r"got 3 \(int\)"):
        parse_freeze(3)


# --- apply_freeze + set_bn_mode -----------------------------------------------------------------------


def test_frozen_stages_stay_bit_identical_including_bn_running_stats() -> None:
    model = _model()
    frozen = parse_freeze(["stem", "layer1"])
    apply_freeze(model, frozen)
    before = _snapshot(model)
    _train(model, frozen, train_bn=False)
    after = model.state_dict()
    for key, old in before.items():
        if stage_of(key) in frozen:
            assert torch.equal(after[key], old), f"frozen {key} changed"
        else:
            assert not torch.equal(after[key], old), f"trainable {key} did not change"


def test_train_bn_updates_bn_stats_and_affine_in_frozen_stages_only() -> None:
    model = _model()
    frozen = ["stem", "layer1"]
    apply_freeze(model, frozen, train_bn=True)
    before = _snapshot(model)
    _train(model, frozen, train_bn=True)
    after = model.state_dict()
    bn_names = {name for name, module in model.named_modules() if isinstance(module, _BatchNorm)}
    for key, old in before.items():
        if stage_of(key) not in frozen:
            continue
        if key.rsplit(".", 1)[0] in bn_names:
            assert not torch.equal(after[key], old), f"BN {key} of a frozen stage did not change"
        else:
            assert torch.equal(after[key], old), f"conv {key} of a frozen stage changed"


def test_apply_freeze_flags_and_unfreezing() -> None:
    model = _model()
    apply_freeze(model, ["stem", "layer1"], train_bn=True)
    assert not model.conv1.weight.requires_grad
    assert model.bn1.weight.requires_grad and model.layer1[0].bn1.bias.requires_grad
    assert not model.layer1[0].conv1.weight.requires_grad
    assert all(p.requires_grad for p in model.layer2.parameters())
    apply_freeze(model, ["stem", "layer1"])
    assert not model.bn1.weight.requires_grad
    apply_freeze(model, [])
    assert all(p.requires_grad for p in model.parameters())


def test_set_bn_mode_only_switches_frozen_bn_to_eval() -> None:
    model = _model()
    model.train()
    set_bn_mode(model, ["stem"], train_bn=False)
    assert not model.bn1.training
    assert model.layer1[0].bn1.training and model.conv1.training
    model.eval()
    set_bn_mode(model, ["stem"], train_bn=False)
    assert not any(module.training for module in model.modules())


def test_freeze_functions_reject_unknown_stage() -> None:
    with pytest.raises(ConfigError, match="'layer9'"):
        apply_freeze(_model(), ["layer9"])
    with pytest.raises(ConfigError, match="'layer9'"):
        set_bn_mode(_model(), ["layer9"], train_bn=True)


# --- param_groups -------------------------------------------------------------------------------------


def test_param_groups_six_in_order_with_geometric_lrs_covering_each_parameter_once() -> None:
    model = _model()
    apply_freeze(model, BACKBONE)  # frozen stages still get their group
    groups = param_groups(model, lr=0.1, weight_decay=1e-4, stage_lr_mult=0.5)
    assert [group["name"] for group in groups] == list(STAGES)
    expected = {
        "fc": 0.1,
        "layer4": 0.05,
        "layer3": 0.025,
        "layer2": 0.0125,
        "layer1": 0.00625,
        "stem": 0.003125,
    }
    assert {group["name"]: group["lr"] for group in groups} == pytest.approx(expected)
    assert all(group["weight_decay"] == 1e-4 for group in groups)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    assert set(grouped) == {id(p) for p in model.parameters()}
    for group in groups:
        assert {stage_of(n) for n, p in model.named_parameters() if any(p is q for q in group["params"])} == {
            group["name"]
        }
    optimizer = torch.optim.AdamW(groups)
    assert len(optimizer.param_groups) == 6


@pytest.mark.parametrize("mults", [{"layer4": 0.1, "fc": 2.0}, OmegaConf.create({"layer4": 0.1, "fc": 2.0})])
def test_param_groups_mapping_multipliers_default_to_one(mults: object) -> None:
    groups = param_groups(_model(), lr=0.01, weight_decay=0.0, stage_lr_mult=mults)  # type: ignore[arg-type]
    lrs = {group["name"]: group["lr"] for group in groups}
    assert lrs == pytest.approx(
        {"stem": 0.01, "layer1": 0.01, "layer2": 0.01, "layer3": 0.01, "layer4": 0.001, "fc": 0.02}
    )


def test_param_groups_without_multiplier_share_one_lr() -> None:
    assert {group["lr"] for group in param_groups(_model(), lr=0.01, weight_decay=0.0)} == {0.01}


@pytest.mark.parametrize(
    ("mults", "needle"),
    [
        ({"layer5": 0.5}, "'layer5'"),
        ({"stem": 0.0}, "stem gets multiplier 0.0"),
        (-0.5, "expected a number > 0"),
    ],
)
def test_param_groups_bad_multipliers(mults: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        param_groups(_model(), lr=0.01, weight_decay=0.0, stage_lr_mult=mults)  # type: ignore[arg-type]


# --- load_weights -------------------------------------------------------------------------------------


def test_load_same_classes_is_exact() -> None:
    source = _snapshot(_model(seed=1))
    model = _model(seed=2)
    assert load_weights(model, source, source="a.pth") is None
    for key, value in model.state_dict().items():
        assert torch.equal(value, source[key]), key


def test_load_imagenet_head_into_four_classes_reinitialises_only_fc() -> None:
    torch.manual_seed(3)
    # Like torchvision's hub file: a 1000-class head and no num_batches_tracked buffers.
    source = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if "num_batches" not in k}
    model = _model(num_classes=4)
    fresh_fc = {key: model.state_dict()[key].clone() for key in ("fc.weight", "fc.bias")}
    message = load_weights(model, source, source="IMAGENET1K_V1")
    assert message == "head re-initialised: IMAGENET1K_V1 has 1000 classes, data has 4 (fc.weight, fc.bias)"
    after = model.state_dict()
    for key, value in source.items():
        if not key.startswith("fc."):
            assert torch.equal(after[key], value), key
    for key, value in fresh_fc.items():
        assert torch.equal(after[key], value), key
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_load_without_head_replacement_rejects_another_class_count() -> None:
    source = _snapshot(_model(num_classes=5))
    message = _load_error(_model(num_classes=3), source, replace_head=False)
    assert "fc.weight (file [5, 512], model [3, 512])" in message
    assert "fc.bias (file [5], model [3])" in message


def _load_error(model: nn.Module, state_dict: dict[str, torch.Tensor], replace_head: bool = True) -> str:
    with pytest.raises(ArtifactError) as info:
        load_weights(model, state_dict, source="weights.pth", replace_head=replace_head)
    return str(info.value)


def test_load_resnet50_into_resnet18_says_resnet50() -> None:
    message = _load_error(_model(), _meta_state_dict("resnet50"))
    assert message.startswith("weights.pth: these weights do not fit the model, a resnet18 with 3 classes")
    assert "this looks like a resnet50 state_dict" in message
    assert "`model.arch=resnet50`" in message
    assert "layer1.0.conv3.weight" in message
    assert "more)" in message  # long key lists are capped


def test_load_prefixed_keys_gives_strip_hint_that_works() -> None:
    source = {f"model.{key}": value for key, value in _snapshot(_model(seed=1)).items()}
    message = _load_error(_model(), source)
    assert "keys are prefixed with `model.`" in message
    snippet = re.search(r"strip the prefix with `(.+?)`", message)
    assert snippet is not None and snippet.group(1) == "{k.removeprefix('model.'): v for k, v in sd.items()}"
    stripped = eval(snippet.group(1), {"sd": source})  # the printed fix, run as the user would
    assert load_weights(_model(), stripped, source="weights.pth") is None


def test_load_missing_key_is_named_and_model_is_untouched() -> None:
    source = _snapshot(_model(seed=1))
    del source["layer3.0.conv1.weight"]
    model = _model(seed=2)
    before = _snapshot(model)
    message = _load_error(model, source)
    assert "Missing from the file (1): layer3.0.conv1.weight." in message
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_load_wrong_shape_non_head_key_is_named() -> None:
    source = _snapshot(_model(seed=1))
    source["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    message = _load_error(_model(), source)
    assert "layer2.0.conv1.weight (file [128, 64, 1, 1], model [128, 64, 3, 3])" in message


def test_load_unexpected_key_is_named() -> None:
    source = _snapshot(_model(seed=1))
    source["fc.extra"] = torch.zeros(1)
    assert "Not in the model (1): fc.extra." in _load_error(_model(), source)


def test_load_whole_checkpoint_points_at_its_state_dict() -> None:
    checkpoint = {"state_dict": _snapshot(_model()), "epoch": 3}
    message = _load_error(_model(), checkpoint)  # type: ignore[arg-type]
    assert "its weights are under `checkpoint['state_dict']`" in message
    assert "Fix: load `checkpoint['state_dict']`, not the whole checkpoint." in message


def test_load_non_tensor_value_is_named() -> None:
    source: dict[str, object] = dict(_snapshot(_model()))
    source["fc.bias"] = [0.0, 0.0, 0.0]
    assert "Not tensors (1): fc.bias." in _load_error(_model(), source)  # type: ignore[arg-type]


# --- describe_state_dict / head_num_classes -----------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_describe_names_each_arch(arch: str) -> None:
    description = describe_state_dict(_meta_state_dict(arch))
    assert description.startswith(f"this looks like a {arch} state_dict (")
    assert "its head has 1000 classes" in description


def test_describe_resnet50_structure() -> None:
    assert describe_state_dict(_meta_state_dict("resnet50", num_classes=10)) == (
        "this looks like a resnet50 state_dict (Bottleneck blocks, layer1.0.conv3 present, "
        "3-4-6-3 blocks per layer); its head has 10 classes (fc.weight [10, 2048])"
    )


def test_describe_wide_variant_and_headless_and_non_resnet() -> None:
    assert "widened resnet50" in describe_state_dict(_meta_state_dict("wide_resnet50_2"))
    headless = {k: v for k, v in _meta_state_dict("resnet18").items() if not k.startswith("fc.")}
    assert "no fc.weight" in describe_state_dict(headless)
    other = {"encoder.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)}
    assert describe_state_dict(other) == "this does not look like a ResNet (first keys: encoder.weight, decoder.bias)"


def test_head_num_classes() -> None:
    state_dict = _meta_state_dict("resnet18", num_classes=12)
    assert head_num_classes(state_dict) == 12
    assert head_num_classes({k: v for k, v in state_dict.items() if not k.startswith("fc.")}) is None

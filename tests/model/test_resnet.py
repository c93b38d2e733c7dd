"""Building ResNets and naming their stages."""

import pytest
import torch
from torchvision.models import ResNet

from retrain.errors import ConfigError
from retrain.model.resnet import ARCHS, STAGES, build_resnet, stage_modules, stage_of


@pytest.mark.parametrize("arch", ARCHS)
def test_build_resnet_has_requested_head_and_every_tensor_maps_to_a_stage(arch: str) -> None:
    with torch.device("meta"):  # shapes only: building resnet152 for real costs seconds
        model = build_resnet(arch, num_classes=7)
    assert isinstance(model, ResNet)
    assert model.fc.out_features == 7
    stages_seen = {stage_of(name) for name in model.state_dict()}
    assert stages_seen == set(STAGES)


def test_build_resnet_unknown_arch_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="resnet18, resnet34, resnet50, resnet101, resnet152") as info:
        build_resnet("resnet19", num_classes=3)
    assert "'resnet19'" in str(info.value)


@pytest.mark.parametrize("bad", [0, -2, True, 2.5])
def test_build_resnet_rejects_bad_class_count(bad: object) -> None:
    with pytest.raises(ConfigError, match="expected an integer >= 1"):
        build_resnet("resnet18", num_classes=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "stage"),
    [
        ("conv1.weight", "stem"),
        ("bn1.running_mean", "stem"),
        ("bn1.num_batches_tracked", "stem"),
        ("layer1.0.conv1.weight", "layer1"),
        ("layer2.0.downsample.1.running_var", "layer2"),
        ("layer3.1.conv2.weight", "layer3"),
        ("layer4.1.bn2.bias", "layer4"),
        ("fc.weight", "fc"),
        ("fc.bias", "fc"),
    ],
)
def test_stage_of(name: str, stage: str) -> None:
    assert stage_of(name) == stage


def test_stage_of_rejects_non_resnet_names() -> None:
    with pytest.raises(ValueError, match=r"model\.conv1\.weight"):
        stage_of("model.conv1.weight")


def test_stage_modules_partition_the_parameters_like_stage_of() -> None:
    model = build_resnet("resnet18", num_classes=3)
    modules = stage_modules(model)
    assert list(modules) == list(STAGES)
    assert modules["stem"] == [model.conv1, model.bn1]
    by_module = {id(p): stage for stage, mods in modules.items() for m in mods for p in m.parameters()}
    by_name = {id(p): stage_of(name) for name, p in model.named_parameters()}
    assert by_module == by_name

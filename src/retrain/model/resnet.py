"""Build torchvision ResNets and name their stages, the unit of freezing, BN policy and learning rates."""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn
from torchvision.models import ResNet

from retrain.errors import ConfigError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")

_BUILDERS: dict[str, Callable[..., ResNet]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
}

# Top-level torchvision attribute -> stage. maxpool/avgpool hold no tensors, so they need no entry.
_STAGE_OF_ATTR = {
    "conv1": "stem",
    "bn1": "stem",
    "layer1": "layer1",
    "layer2": "layer2",
    "layer3": "layer3",
    "layer4": "layer4",
    "fc": "fc",
}


def build_resnet(arch: str, num_classes: int) -> ResNet:
    """Build a randomly initialised torchvision ResNet, so every weight source loads into one known layout."""
    if arch not in _BUILDERS:
        raise ConfigError(
            f"model.arch: unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}. "
            f"Fix: set e.g. `model.arch=resnet18`."
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(
            f"num_classes: got {num_classes!r}, expected an integer >= 1. "
            f"The class count comes from the class folders of data.root; check that it holds class folders."
        )
    # weights=None: pretrained weights always go through load_weights, which checks every key.
    return _BUILDERS[arch](weights=None, num_classes=num_classes)


def stage_of(name: str) -> str:
    """Map a torchvision parameter or buffer name (`layer3.1.conv2.weight`) to its stage."""
    stage = _STAGE_OF_ATTR.get(name.split(".", 1)[0])
    if stage is None:
        raise ValueError(
            f"{name!r} is not a torchvision ResNet parameter or buffer name; "
            f"expected it to start with one of {', '.join(_STAGE_OF_ATTR)}."
        )
    return stage


def stage_modules(model: ResNet) -> dict[str, list[nn.Module]]:
    """Return each stage's modules in STAGES order, for callers that act on whole stages."""
    return {
        "stem": [model.conv1, model.bn1],
        "layer1": [model.layer1],
        "layer2": [model.layer2],
        "layer3": [model.layer3],
        "layer4": [model.layer4],
        "fc": [model.fc],
    }

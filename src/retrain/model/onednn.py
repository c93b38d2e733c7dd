"""A frozen ResNet trunk on oneDNN's own CPU tensor layout, for the passes that run it over a whole split.

Eager PyTorch on a CPU converts every convolution's input and weight to oneDNN's blocked layout and back, on every
call. Here the activations stay in that layout from the first convolution to the pooled features, each weight is
converted once, and for the eval pass (the feature cache) each BatchNorm is folded into the convolution before it.
The same arithmetic as eager mode, within float rounding; measured in one process on the 2-core AMD EPYC (Zen 5,
AVX512_BF16), ResNet18 at 224 px, batch 64, images/s, three interleaved rounds: bf16 autocast NHWC (eager)
79 / 77 / 74, this trunk in bf16 94 / 93 / 88; in fp32 eager 39 / 36 / 40, this trunk 40 / 41 / 43.
torch.utils.mkldnn converts modules the same way, but through TorchScript, which is deprecated.
"""

from __future__ import annotations

import copy
from typing import TypeGuard

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import ResNet

DTYPES = (torch.float32, torch.bfloat16)


def onednn_usable(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether `device` and `dtype` can take the oneDNN trunk: a CPU build with oneDNN, fp32 or bf16 it supports."""
    if device.type != "cpu" or dtype not in DTYPES or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def onednn_supports(model: nn.Module) -> TypeGuard[ResNet]:
    """Whether `model` is a torchvision ResNet whose convolutions all pad with zeros by a number of pixels (as the
    torchvision ones do): what `OneDnnConv2d` computes."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return isinstance(model, ResNet) and all(
        type(c) is nn.Conv2d and c.padding_mode == "zeros" and not isinstance(c.padding, str) for c in convs
    )


class OneDnnConv2d(nn.Module):
    """A frozen Conv2d whose weight is converted to oneDNN's layout once; takes and returns oneDNN tensors."""

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype) -> None:
        super().__init__()
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(f"OneDnnConv2d pads with zeros by a number of pixels, not {conv}")
        self.geometry = (conv.padding, conv.stride, conv.dilation, conv.groups)
        weight = conv.weight.detach().to_mkldnn(dtype)
        reorder = getattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", None)  # as torch.utils.mkldnn does
        self.weight = weight if reorder is None else reorder(weight, *self.geometry)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.bias = bias.float().to_mkldnn()  # fp32 bias in bf16 too, for accuracy (as torch.utils.mkldnn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution, on and to oneDNN's layout."""
        return torch.mkldnn_convolution(x, self.weight, self.bias, *self.geometry)


class _ToOneDnn(nn.Module):
    """The trunk's entry: dense images to oneDNN's layout in the trunk's dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convert a dense batch (the loader's NCHW converts fastest)."""
        return x if x.is_mkldnn else x.to_mkldnn(self.dtype)


class _DensePool(nn.Module):
    """The trunk's exit: global average pool, back to a dense tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool each channel to one value; dense from here on."""
        return nn.functional.adaptive_avg_pool2d(x, 1).to_dense()


def _conv_bn_pairs(model: ResNet) -> list[tuple[nn.Module, str, str]]:
    """(parent, conv name, BatchNorm name) for every convolution a torchvision ResNet normalizes right after."""
    pairs: list[tuple[nn.Module, str, str]] = [(model, "conv1", "bn1")]
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            pairs += [(block, f"conv{k}", f"bn{k}") for k in (1, 2, 3) if hasattr(block, f"conv{k}")]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    return pairs


def onednn_trunk(model: ResNet, dtype: torch.dtype, *, fold_bn: bool) -> ResNet:
    """A copy of `model` that maps dense images to pooled features through oneDNN-layout tensors (no fc).

    fold_bn: each BatchNorm is folded into its convolution with its current running statistics (the eval pass).
    Otherwise the copy shares `model`'s BatchNorm modules, so a train-mode pass through it updates `model`'s running
    statistics and fires their hooks (the BatchNorm adaptation). The copy is frozen: no gradients.
    """
    shared = {} if fold_bn else {id(m): m for m in model.modules() if isinstance(m, _BatchNorm)}
    trunk = copy.deepcopy(model, memo=shared)
    if fold_bn:
        for parent, conv_name, bn_name in _conv_bn_pairs(trunk):
            conv, bn = parent.get_submodule(conv_name), parent.get_submodule(bn_name)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm):
                parent.register_module(conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
                parent.register_module(bn_name, nn.Identity())
    for name, module in list(trunk.named_modules()):
        if isinstance(module, nn.Conv2d):
            parent_name, _, child = name.rpartition(".")
            trunk.get_submodule(parent_name).register_module(child, OneDnnConv2d(module, dtype))
    trunk.conv1 = nn.Sequential(_ToOneDnn(dtype), trunk.conv1)
    trunk.avgpool = _DensePool()
    trunk.fc = nn.Identity()
    return trunk.requires_grad_(False)

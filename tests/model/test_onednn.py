"""The oneDNN trunk the feature cache and the BatchNorm adaptation run on CPUs: the eager model's numbers, faster."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from retrain.model.bn_adapt import adapt_bn_stats
from retrain.model.extraction import onednn_dtype
from retrain.model.feature_cache import pooled_features
from retrain.model.onednn import onednn_supports, onednn_trunk, onednn_usable
from retrain.model.resnet import build_resnet
from retrain.model.surgery import BACKBONE

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a CPU build without oneDNN")
CPU = torch.device("cpu")


def _pretrained_like(arch: str) -> nn.Module:
    """A ResNet whose BatchNorms hold statistics and affine weights far from their fresh values, as trained ones do."""
    torch.manual_seed(0)
    net = build_resnet(arch, 3).eval()
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return net


def _images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(1)) * 2 + 1


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])  # basic blocks, and bottlenecks with conv3/bn3
def test_the_folded_trunk_gives_the_eager_models_features(arch: str) -> None:
    net = _pretrained_like(arch)
    before = copy.deepcopy(net.state_dict())
    with torch.inference_mode():
        expected = pooled_features(net, _images())
        fp32 = onednn_trunk(net, torch.float32, fold_bn=True)(_images())
    assert not fp32.is_mkldnn and fp32.shape == expected.shape  # dense features out, as the cache stores them
    torch.testing.assert_close(fp32, expected, rtol=1e-4, atol=1e-4)
    if onednn_usable(CPU, torch.bfloat16):
        with torch.inference_mode():
            bf16 = onednn_trunk(net, torch.bfloat16, fold_bn=True)(_images()).float()
        # bf16 keeps 8 bits of mantissa: each feature within a few percent of the network's output scale.
        assert (bf16 - expected).abs().max() < 0.05 * expected.abs().max()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())  # the model itself is untouched


def test_adapting_through_the_trunk_moves_the_models_own_statistics_as_eager_mode_does() -> None:
    eager, through_trunk = _pretrained_like("resnet18"), _pretrained_like("resnet18")
    batches = list(_images(12).split(4))
    adapt_bn_stats(eager, batches, BACKBONE)
    trunk = onednn_trunk(through_trunk, torch.float32, fold_bn=False)
    weights = through_trunk.conv1.weight.clone()
    adapt_bn_stats(trunk, batches, BACKBONE)
    adapted = {k: v for k, v in eager.state_dict().items() if "running" in k}
    assert adapted and all(not torch.equal(v, _pretrained_like("resnet18").state_dict()[k]) for k, v in adapted.items())
    for key, value in adapted.items():
        torch.testing.assert_close(through_trunk.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    assert torch.equal(through_trunk.conv1.weight, weights) and not through_trunk.training  # modes restored too


def test_what_the_trunk_cannot_compute_stays_in_eager_mode() -> None:
    net = _pretrained_like("resnet18")
    assert onednn_supports(net)
    net.layer1[0].conv1.padding_mode = "reflect"  # onednn pads with zeros only
    assert not onednn_supports(net)
    assert not onednn_supports(nn.Sequential(nn.Conv2d(3, 4, 3)))  # not a torchvision ResNet
    assert not onednn_usable(CPU, torch.float16) and not onednn_usable(torch.device("meta"), torch.float32)
    # None is the Trainer's precision: plain fp32 runs on the trunk, a mixed precision stays in eager mode.
    assert onednn_dtype(None, CPU, "32-true") == torch.float32
    assert onednn_dtype(None, CPU, "bf16-mixed") is None

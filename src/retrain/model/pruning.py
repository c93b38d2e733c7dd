"""Magnitude pruning before retraining (torch.nn.utils.prune), with checkpoints that stay plain state_dicts.

Decisions:
- Only convolutions are pruned, each by the same fraction (as the PyTorch pruning tutorial does per layer).
  The head is left alone: structured pruning of `fc` would delete whole classes, and it is tiny anyway.
- During retraining torch keeps `weight_orig` and `weight_mask`. State-dict hooks save them as one plain
  `weight` (= orig * mask, zeros where pruned), so every checkpoint loads into a torchvision ResNet. Loading
  such a `weight` back rebuilds the mask from its zeros, which is how resume and the best-checkpoint reload
  keep the masks: a surviving weight is exactly 0.0 with negligible probability.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from retrain.errors import ConfigError
from retrain.model.resnet import STAGES, stage_of

log = logging.getLogger("retrain")

METHODS = ("l1_unstructured", "ln_structured")


def _convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def check_prune_config(amount: float, method: str) -> None:
    """Reject an amount or method that torch would fail on later with a less helpful message."""
    if method not in METHODS:
        raise ConfigError(
            f"model.prune.method={method!r} is not a pruning method; expected one of {list(METHODS)}. "
            "Fix: model.prune.method=l1_unstructured (single weights) or ln_structured (whole channels)."
        )
    if isinstance(amount, bool) or not isinstance(amount, int | float) or not 0.0 <= amount < 1.0:
        raise ConfigError(
            f"model.prune.amount={amount!r} is out of range; expected a fraction in [0, 1) of each "
            "convolution's weights to remove. Fix: e.g. model.prune.amount=0.3 (0 disables pruning)."
        )


def prune_convolutions(model: nn.Module, amount: float, method: str) -> dict[str, Any]:
    """Prune every convolution of a ResNet by `amount` and keep the masks; returns the achieved sparsity."""
    check_prune_config(amount, method)
    for _, conv in _convs(model):
        if method == "l1_unstructured":
            prune.l1_unstructured(conv, "weight", amount=amount)
        else:  # L2 norm over each output channel: whole filters go, which can speed up dense kernels later
            prune.ln_structured(conv, "weight", amount=amount, n=2, dim=0)
        conv.register_state_dict_post_hook(_save_plain_weight)
        conv.register_load_state_dict_pre_hook(_load_plain_weight)
    return {"method": method, "amount": float(amount), "sparsity": sparsity_by_stage(model)}


def _save_plain_weight(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    if prefix + "weight_orig" in state_dict:
        orig = state_dict.pop(prefix + "weight_orig")
        mask = state_dict.pop(prefix + "weight_mask")
        state_dict[prefix + "weight"] = orig * mask


def _load_plain_weight(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    weight = state_dict.get(prefix + "weight")
    if weight is not None and hasattr(module, "weight_mask"):
        state_dict[prefix + "weight_orig"] = state_dict.pop(prefix + "weight")
        state_dict[prefix + "weight_mask"] = (weight != 0).to(module.weight_mask.dtype)


def make_permanent(model: nn.Module) -> dict[str, float]:
    """Fold the masks into the weights (prune.remove), so the model is a plain ResNet; returns the sparsity."""
    for _, conv in _convs(model):
        if prune.is_pruned(conv):
            prune.remove(conv, "weight")  # the state-dict hooks stay, inert: they only act on masks
    return sparsity_by_stage(model)


def sparsity_by_stage(model: nn.Module) -> dict[str, float]:
    """The fraction of exactly-zero convolution weights per stage (and `all`), as the forward pass sees them."""
    zeros = dict.fromkeys(STAGES, 0)
    totals = dict.fromkeys(STAGES, 0)
    with torch.no_grad():
        for name, conv in _convs(model):
            weight = conv.weight  # orig * mask while pruning is active
            stage = stage_of(name + ".weight")
            zeros[stage] += int((weight == 0).sum())
            totals[stage] += weight.numel()
    result = {stage: round(zeros[stage] / totals[stage], 4) for stage in STAGES if totals[stage]}
    result["all"] = round(sum(zeros.values()) / max(1, sum(totals.values())), 4)
    return result


def prune_from_config(model: nn.Module, amount: float, method: str) -> dict[str, Any] | None:
    """Prune as `model.prune` asks, or return None when its amount is 0 (the default: no pruning)."""
    check_prune_config(amount, method)
    return prune_convolutions(model, amount, method) if amount > 0 else None


def warn_if_pruning_is_lost(parent: Mapping[str, Any] | None, source: str, *, qat: bool) -> None:
    """A pruned model trained again without `model.prune` trains its zeros back: say so, and how to keep them."""
    record = (parent or {}).get("prune")
    if not record:
        return
    pruned = f"{source} was pruned ({record.get('method')}, amount {record.get('amount')})"
    if qat:
        log.warning(
            "%s, but QAT trains every weight, so the zeros fill in and the int8 model is not pruned. Fix: for an "
            "int8 model that keeps them, quantize the pruned model after training (python export.py "
            "ckpt_path=%s formats=[int8]).",
            pruned,
            source,
        )
    else:
        log.warning(
            "%s, but this run trains every weight, so the zeros fill in and the model it publishes is not pruned. "
            "Fix: model.prune.amount=%s model.prune.method=%s prunes the same weights again and keeps them zero.",
            pruned,
            record.get("amount"),
            record.get("method"),
        )

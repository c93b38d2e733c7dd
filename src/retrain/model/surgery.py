"""Freezing, BatchNorm policy, per-stage optimizer groups and checked weight loading for torchvision ResNets.

Everything here is a pure function on an `nn.Module` or a `state_dict`, so it is tested without a Trainer.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from retrain.errors import ArtifactError, ConfigError
from retrain.model.resnet import STAGES, stage_of

# What `model.freeze=true` and `model.freeze=all` freeze: everything but the head, since a model whose
# head is frozen too has nothing left to train. Freezing fc as well must be spelled out in a list.
BACKBONE = STAGES[:-1]
HEAD_KEYS = ("fc.weight", "fc.bias")
_FREEZE_HOWTO = (
    "Write e.g. `model.freeze=[stem,layer1]`, `model.freeze=true` (every stage but fc) or `model.freeze=false`."
)
_SHOWN_KEYS = 8  # per category in an error, so a wholly wrong file gives a readable message
_ARCH_OF_LAYOUT = {
    ("BasicBlock", (2, 2, 2, 2)): "resnet18",
    ("BasicBlock", (3, 4, 6, 3)): "resnet34",
    ("Bottleneck", (3, 4, 6, 3)): "resnet50",
    ("Bottleneck", (3, 4, 23, 3)): "resnet101",
    ("Bottleneck", (3, 8, 36, 3)): "resnet152",
}
_STANDARD_WIDTH = 64  # output channels of layer1.0.conv1 in every torchvision resnet18..152


def _check_stages(names: Iterable[Any], key: str) -> list[str]:
    """Validate stage names and return them in STAGES order without duplicates."""
    wanted = list(names)
    for name in wanted:
        if name not in STAGES:
            close = difflib.get_close_matches(str(name), STAGES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{key}: unknown stage {name!r}; expected names from {', '.join(STAGES)}.{hint} {_FREEZE_HOWTO}"
            )
    return [stage for stage in STAGES if stage in wanted]


def parse_freeze(spec: object) -> list[str]:
    """Turn the `model.freeze` config value into stage names in STAGES order, so callers see one form.

    true / "all" -> every stage but fc; false / None / "none" / "" -> nothing; a list or a comma string of
    stage names -> those stages (fc included if named).
    """
    if spec is None or spec is False:
        return []
    if spec is True:
        return list(BACKBONE)
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower() == "all":
            return list(BACKBONE)
        if text.lower() in ("", "none"):
            return []
        return _check_stages([part.strip() for part in text.split(",")], "model.freeze")
    if isinstance(spec, Sequence):  # list, tuple and OmegaConf's ListConfig
        return _check_stages(spec, "model.freeze")
    raise ConfigError(
        f"model.freeze: got {spec!r} ({type(spec).__name__}); expected true, false or a list of stage names "
        f"from {', '.join(STAGES)}. {_FREEZE_HOWTO}"
    )


def _qualified(module_name: str, tensor_name: str) -> str:
    return f"{module_name}.{tensor_name}" if module_name else tensor_name


def apply_freeze(model: nn.Module, frozen: Iterable[str], *, train_bn: bool = False) -> None:
    """Set requires_grad per stage, so frozen stages get no gradients and the optimizer skips them.

    With train_bn=True, BatchNorm weight/bias of frozen stages stay trainable (fastai's `train_bn`),
    matching `set_bn_mode(..., train_bn=True)`, which keeps their running statistics updating.
    """
    frozen_stages = set(_check_stages(frozen, "freeze"))
    for module_name, module in model.named_modules():
        is_bn = isinstance(module, _BatchNorm)
        for param_name, param in module.named_parameters(recurse=False):
            stage = stage_of(_qualified(module_name, param_name))
            param.requires_grad_(stage not in frozen_stages or (train_bn and is_bn))


def set_bn_mode(model: nn.Module, frozen: Iterable[str], train_bn: bool) -> None:
    """Put the BatchNorms of frozen stages in eval mode, so their running statistics stay as loaded.

    Call it after every `model.train()`, which switches all of them back. It only ever switches BN layers
    to eval, so calling it on a model in eval mode changes nothing. With train_bn=True it changes nothing:
    frozen stages' BN layers then keep learning both running statistics and (see apply_freeze) weight/bias.
    """
    frozen_stages = set(_check_stages(frozen, "freeze"))
    if train_bn:
        return
    for module_name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and stage_of(module_name) in frozen_stages:
            module.eval()


def _stage_multipliers(spec: float | Mapping[str, float] | None) -> dict[str, float]:
    """Resolve `stage_lr_mult` into one LR multiplier per stage."""
    howto = "Write e.g. `stage_lr_mult=0.5` (fc 1, layer4 0.5, layer3 0.25, ...) or `stage_lr_mult={layer4: 0.5}`."
    if spec is None:
        return dict.fromkeys(STAGES, 1.0)
    if isinstance(spec, Mapping):
        unknown = [name for name in spec if name not in STAGES]
        if unknown:
            raise ConfigError(
                f"stage_lr_mult: unknown stage(s) {', '.join(map(repr, unknown))}; expected names from "
                f"{', '.join(STAGES)}. {howto}"
            )
        mults = {stage: spec.get(stage, 1.0) for stage in STAGES}
    elif isinstance(spec, (int, float)) and not isinstance(spec, bool):
        # Discriminative LRs: each stage further from the head learns m times slower than the next.
        mults = {stage: float(spec) ** (len(STAGES) - 1 - i) for i, stage in enumerate(STAGES)}
    else:
        raise ConfigError(f"stage_lr_mult: got {spec!r}; expected a number, a mapping or null. {howto}")
    for stage, mult in mults.items():
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or mult <= 0:
            raise ConfigError(
                f"stage_lr_mult: {stage} gets multiplier {mult!r}; expected a number > 0. "
                f"To stop a stage from learning, freeze it (`model.freeze=[{stage}]`). {howto}"
            )
    return {stage: float(mult) for stage, mult in mults.items()}


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    stage_lr_mult: float | Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Build one optimizer group per stage, all six always, so resume and DDP see a fixed optimizer layout.

    Frozen stages are included: unfreezing flips requires_grad (and may change a group's lr), never the
    set of groups. Each group carries its `name` and `lr_mult` so callbacks can rescale it later.
    Weight decay applies to every parameter, BN and bias included: exempting them would need a second
    group per stage, and the fixed one-group-per-stage layout matters more here.
    """
    if lr <= 0:
        raise ConfigError(f"lr: got {lr!r}; expected a learning rate > 0, e.g. 1e-3.")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay: got {weight_decay!r}; expected a number >= 0, e.g. 1e-4.")
    mults = _stage_multipliers(stage_lr_mult)
    params: dict[str, list[nn.Parameter]] = {stage: [] for stage in STAGES}
    for name, param in model.named_parameters():
        params[stage_of(name)].append(param)
    return [
        {
            "params": params[stage],
            "lr": lr * mults[stage],
            "weight_decay": weight_decay,
            "name": stage,
            "lr_mult": mults[stage],
        }
        for stage in STAGES
    ]


@dataclass(frozen=True)
class _Layout:
    """The ResNet structure read off a state_dict's keys and shapes."""

    prefix: str
    block: str
    counts: tuple[int, int, int, int]
    width: int
    num_classes: int | None

    @property
    def arch(self) -> str | None:
        if self.width != _STANDARD_WIDTH:
            return None
        return _ARCH_OF_LAYOUT.get((self.block, self.counts))


def _infer_layout(state_dict: Mapping[str, Any]) -> _Layout | None:
    """Find the ResNet stem and blocks in a state_dict, allowing one common key prefix; None if absent."""
    keys = [key for key in state_dict if isinstance(key, str)]
    # The shortest prefix wins, so `model.conv1.weight` beats `model.layer1.0.conv1.weight`.
    candidates = sorted((key[: -len("conv1.weight")] for key in keys if key.endswith("conv1.weight")), key=len)
    prefix = next(
        (
            p
            for p in candidates
            if (p == "" or p.endswith(".")) and isinstance(state_dict.get(f"{p}layer1.0.conv1.weight"), torch.Tensor)
        ),
        None,
    )
    if prefix is None:
        return None
    block = "Bottleneck" if f"{prefix}layer1.0.conv3.weight" in state_dict else "BasicBlock"
    counts = []
    for layer in range(1, 5):
        pattern = re.compile(rf"{re.escape(prefix)}layer{layer}\.(\d+)\.")
        counts.append(len({match.group(1) for key in keys if (match := pattern.match(key))}))
    fc_weight = state_dict.get(f"{prefix}fc.weight")
    num_classes = int(fc_weight.shape[0]) if isinstance(fc_weight, torch.Tensor) and fc_weight.ndim == 2 else None
    return _Layout(
        prefix=prefix,
        block=block,
        counts=(counts[0], counts[1], counts[2], counts[3]),
        width=int(state_dict[f"{prefix}layer1.0.conv1.weight"].shape[0]),
        num_classes=num_classes,
    )


def _first_keys(keys: Iterable[Any], limit: int = 5) -> str:
    keys = [str(key) for key in keys]
    more = f", ... ({len(keys)} keys in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def describe_state_dict(state_dict: object) -> str:
    """Say what a weights file looks like (arch, head, key prefix), so a load error explains itself."""
    if not isinstance(state_dict, Mapping):
        return f"this is a {type(state_dict).__name__}, not a state_dict (a mapping of names to tensors)"
    if not state_dict:
        return "this state_dict is empty"
    if isinstance(state_dict.get("state_dict"), Mapping):
        return (
            f"this is a whole checkpoint, not a state_dict (top-level keys: {_first_keys(state_dict)}); "
            f"its weights are under `checkpoint['state_dict']`"
        )
    layout = _infer_layout(state_dict)
    if layout is None:
        return f"this does not look like a ResNet (first keys: {_first_keys(state_dict)})"
    counts = "-".join(map(str, layout.counts))
    conv3 = "layer1.0.conv3 present" if layout.block == "Bottleneck" else "no layer1.0.conv3"
    structure = f"{layout.block} blocks, {conv3}, {counts} blocks per layer"
    base = _ARCH_OF_LAYOUT.get((layout.block, layout.counts))
    if layout.arch is not None:
        parts = [f"this looks like a {layout.arch} state_dict ({structure})"]
    elif base is not None:
        parts = [
            f"this looks like a widened {base} ({structure}; layer1.0.conv1 has {layout.width} output "
            f"channels instead of {_STANDARD_WIDTH}: a wide_resnet or ResNeXt variant, which retrain "
            f"does not build)"
        ]
    else:
        parts = [f"this looks like a ResNet that matches none of resnet18..resnet152 ({structure})"]
    fc_weight = state_dict.get(f"{layout.prefix}fc.weight")
    if layout.num_classes is not None and isinstance(fc_weight, torch.Tensor):
        parts.append(f"its head has {layout.num_classes} classes (fc.weight {list(fc_weight.shape)})")
    else:
        parts.append("it has no fc.weight, so no classification head")
    if layout.prefix:
        p = layout.prefix
        parts.append(
            f"keys are prefixed with `{p}`; strip the prefix with `{{k.removeprefix('{p}'): v for k, v in sd.items()}}`"
        )
    return "; ".join(parts)


def head_num_classes(state_dict: Mapping[str, Any]) -> int | None:
    """Return the class count of a torchvision-keyed state_dict's head, or None when it has no fc.weight."""
    weight = state_dict.get("fc.weight")
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None


def _head_swap(state_dict: Mapping[str, Any], target: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """Return (source classes, model classes) when only the head's class count differs, else None."""
    weight, bias = state_dict.get("fc.weight"), state_dict.get("fc.bias")
    model_weight = target.get("fc.weight")
    if not (
        isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor) and isinstance(model_weight, torch.Tensor)
    ):
        return None
    fits_backbone = weight.ndim == 2 and weight.shape[1] == model_weight.shape[1]
    consistent = bias.shape == (weight.shape[0],)
    if fits_backbone and consistent and weight.shape[0] != model_weight.shape[0]:
        return int(weight.shape[0]), int(model_weight.shape[0])
    return None


def _key_list(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN_KEYS])
    more = f" (+{len(items) - _SHOWN_KEYS} more)" if len(items) > _SHOWN_KEYS else ""
    return f"{title} ({len(items)}): {shown}{more}."


def _model_words(layout: _Layout | None) -> str:
    if layout is None or layout.arch is None:
        return "the model"
    return f"the model, a {layout.arch} with {layout.num_classes} classes"


def _mismatch_error(
    source: str,
    state_dict: Mapping[str, Any],
    target: Mapping[str, torch.Tensor],
    categories: Mapping[str, list[str]],
) -> ArtifactError:
    """Build the one-paragraph error: what differs (capped key lists), what the file is, and the fix."""
    file_layout, model_layout = _infer_layout(state_dict), _infer_layout(target)
    fixes = []
    if isinstance(state_dict.get("state_dict"), Mapping):
        fixes.append("load `checkpoint['state_dict']`, not the whole checkpoint")
    if file_layout is not None and file_layout.prefix:
        fixes.append(f"strip the `{file_layout.prefix}` prefix as shown")
    if file_layout and model_layout and file_layout.arch and model_layout.arch != file_layout.arch:
        fixes.append(
            f"set `model.arch={file_layout.arch}` to match the file, or load weights saved from a {model_layout.arch}"
        )
    if not fixes:
        fixes.append("load weights saved from the same architecture, with torchvision's key names")
    parts = [
        f"{source}: these weights do not fit {_model_words(model_layout)}; only fc.weight and "
        f"fc.bias may differ (the head is then re-initialised)."
    ]
    parts.extend(_key_list(title, items) for title, items in categories.items() if items)
    parts.append(f"The file: {describe_state_dict(state_dict)}.")
    parts.append(f"Fix: {'; '.join(fixes)}.")
    return ArtifactError(" ".join(parts))


def raise_for_non_finite(state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Refuse weights holding NaN or inf: every output of such a model is NaN, and training from it stays NaN."""
    bad = [
        f"{key} ({int((~torch.isfinite(tensor)).sum())} of {tensor.numel()} values)"
        for key, tensor in state_dict.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise ArtifactError(
            f"{source}: {len(bad)} tensors hold NaN or inf: {', '.join(bad[:_SHOWN_KEYS])}"
            f"{f' (+{len(bad) - _SHOWN_KEYS} more)' if len(bad) > _SHOWN_KEYS else ''}. Expected finite weights. "
            "Fix: load a file saved before training diverged (an earlier checkpoint or registry version), or "
            "start from other weights (model.init_from=IMAGENET1K_V1, or null for random ones)."
        )


def load_weights(
    model: nn.Module, state_dict: Mapping[str, Any], *, source: str, replace_head: bool = True
) -> str | None:
    """Load torchvision-keyed weights strictly; only a head of another class count may differ.

    A differing head leaves the model's freshly initialised fc in place and returns one line saying so;
    None means every tensor was loaded. replace_head=False (eval, predict, export: the artifact must be
    used as is) makes a differing head an error too. Missing `num_batches_tracked` buffers are tolerated
    (torchvision's own ImageNet files predate them); the model keeps its own. Any other mismatch raises
    ArtifactError.
    """
    if not isinstance(state_dict, Mapping):
        raise ArtifactError(
            f"{source}: expected a state_dict (a mapping of names to tensors); {describe_state_dict(state_dict)}."
        )
    target = model.state_dict()
    not_tensors = [key for key in target if key in state_dict and not isinstance(state_dict[key], torch.Tensor)]
    missing = [key for key in target if key not in state_dict and not key.endswith(".num_batches_tracked")]
    unexpected = [str(key) for key in state_dict if key not in target]
    head = _head_swap(state_dict, target) if replace_head else None
    wrong_shape = [
        f"{key} (file {list(state_dict[key].shape)}, model {list(tensor.shape)})"
        for key, tensor in target.items()
        if isinstance(state_dict.get(key), torch.Tensor)
        and state_dict[key].shape != tensor.shape
        and not (head and key in HEAD_KEYS)
    ]
    if not_tensors or missing or unexpected or wrong_shape:
        categories = {
            "Not tensors": not_tensors,
            "Missing from the file": missing,
            "Not in the model": unexpected,
            "Wrong shape": wrong_shape,
        }
        raise _mismatch_error(source, state_dict, target, categories)
    raise_for_non_finite({key: state_dict[key] for key in target if key in state_dict}, source=source)
    # The model's own tensors fill in the head (when swapped) and absent counters; copying them onto
    # themselves is a no-op, and strict=True still guards the key set.
    to_load = {
        key: tensor if key not in state_dict or (head and key in HEAD_KEYS) else state_dict[key]
        for key, tensor in target.items()
    }
    model.load_state_dict(to_load, strict=True)
    if head is None:
        return None
    return f"head re-initialised: {source} has {head[0]} classes, data has {head[1]} (fc.weight, fc.bias)"

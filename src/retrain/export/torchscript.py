"""TorchScript, for existing users of torch.jit (deprecated in current torch: prefer the torch.export format)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from retrain.inference.deploy_info import EXTRA_FILE
from retrain.utils.io import atomic_write


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, props: dict[str, str]) -> Path:
    """Trace and freeze the model (BatchNorm folded into the convolutions) and save it with its metadata."""
    # Tracing suits a ResNet: its forward has no data-dependent control flow, and the traced graph keeps the
    # batch size dynamic. check_trace compares the traced and eager outputs on the example.
    with warnings.catch_warnings(), torch.no_grad():
        # torch.jit is deprecated (FutureWarning on every call); users asked for this format knowingly.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        frozen = torch.jit.freeze(torch.jit.trace(model.eval(), example))
        extra = {EXTRA_FILE: json.dumps(props)}
        atomic_write(Path(path), lambda f: torch.jit.save(frozen, f, _extra_files=extra))
    return Path(path)

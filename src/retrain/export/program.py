"""torch.export: the path forward from TorchScript, saved as a `.pt2` archive with torch.export.save."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from retrain.inference.deploy_info import EXTRA_FILE
from retrain.utils.io import atomic_write


def batch_dim() -> dict[int, torch.export.Dim]:
    """The dynamic batch axis every export shares (examples use batch 2: torch specializes sizes 0 and 1)."""
    return {0: torch.export.Dim("batch", min=1, max=4096)}


def export_program(model: nn.Module, example: torch.Tensor, path: Path, props: dict[str, str]) -> Path:
    """Capture the eval-mode graph with a dynamic batch axis and save it with its metadata."""
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=(batch_dim(),))
    extra = {EXTRA_FILE: json.dumps(props)}
    atomic_write(Path(path), lambda f: torch.export.save(program, f, extra_files=extra))
    return Path(path)

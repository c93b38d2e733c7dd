"""Quantization-aware training in `train.py experiment=qat`: fake quantization while fine-tuning, int8 at the end.

The float artifact's weights are fine-tuned through a PT2E graph with fake quantizers (see quantize.py), so
the network learns weights that survive int8 rounding. The run publishes the fine-tuned float weights as usual
(plain torchvision keys) and, beside them, the int8 package with its report in `exports/`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.fx import GraphModule

from retrain.errors import ConfigError
from retrain.export.benchmark import REPORT_FILE, Targets, build_report, table
from retrain.export.quantize import convert_qat, prepare_qat, save_int8
from retrain.inference.deploy_info import DeployInfo, to_props, write_sidecar
from retrain.inference.runtimes import FILE_NAMES
from retrain.model.resnet import build_resnet
from retrain.utils.io import write_json


def start_qat(
    net: torch.nn.Module, cfg: DictConfig, *, frozen: list[str], image_size: int, resuming: bool
) -> GraphModule:
    """Check that the run can be quantization-aware, then return the network with fake quantization inserted."""
    if cfg.model.init_from is None and not resuming:
        raise ConfigError(
            "experiment=qat fine-tunes a trained float model, but model.init_from is not set. Expected a float "
            "artifact (a .ckpt/.safetensors file or a registry reference). Fix: add model.init_from=NAME@latest."
        )
    if frozen:
        raise ConfigError(
            f"experiment=qat with frozen stages {frozen} (model.freeze or an unfreeze schedule): the quantized graph "
            "has no BatchNorm modules to keep in eval mode, and int8 rounding affects every stage. Expected "
            "model.freeze=false and no unfreeze callback. Fix: drop those overrides."
        )
    if float(cfg.model.prune.amount) > 0:
        raise ConfigError(
            "experiment=qat together with model.prune.amount > 0 is not supported: the masks would be traced into "
            "the quantized graph, and QAT trains the pruned weights back. Fix: prune in one run, then quantize that "
            "version with python export.py ckpt_path=<that version> formats=[int8], which keeps its zeros."
        )
    return prepare_qat(net, torch.randn(2, 3, image_size, image_size))


def finish_qat(
    prepared: torch.nn.Module,
    info: DeployInfo,
    out_dir: Path,
    val_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    settings: DictConfig,
) -> dict[str, Any]:
    """Convert the trained graph to int8, package it, and measure it against its own float weights."""
    assert isinstance(prepared, GraphModule), "finish_qat expects the network start_qat returned"
    float_model = build_resnet(str(info.arch), len(info.class_names))
    float_model.load_state_dict(prepared.state_dict())  # the fine-tuned float weights, plain keys
    size = info.preprocessing.crop
    example = torch.randn(2, 3, size, size)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = save_int8(convert_qat(prepared), example, out_dir / FILE_NAMES["int8"], to_props(info))
    write_sidecar(out_dir, info)
    targets = Targets()
    report = build_report(
        float_model,
        info,
        {"int8": path},
        val_batches,
        warmup=settings.bench.warmup,
        runs=settings.bench.runs,
        targets=targets,
    )
    write_json(out_dir / REPORT_FILE, report)
    print(f"\nquantization-aware training, int8 export:\n{table(report)}\n", flush=True)
    return {
        "out_dir": str(out_dir),
        "int8": str(path),
        "report_file": str(out_dir / REPORT_FILE),
        "val_acc": {name: row["val_acc"] for name, row in report["formats"].items()},
        "targets": report["targets"],
    }

"""ONNX: a dynamic batch axis, named input and output, metadata_props, the checker, and onnxruntime."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from retrain.errors import ConfigError
from retrain.export.program import batch_dim
from retrain.utils.io import atomic_write

INPUT = "images"
OUTPUT = "logits"


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, props: dict[str, str], opset: int) -> Path:
    """Export with torch.onnx's dynamo exporter, add the metadata, check the model and save it as one file."""
    for name in ("onnxscript", "onnx_ir"):  # they log every optimization pass at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model.eval(),
            (example,),
            raw,
            dynamo=True,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=(batch_dim(),),
            opset_version=opset,
            external_data=False,  # one self-contained file; ResNets are far below protobuf's 2 GB limit
            verbose=False,
        )
        proto = onnx.load(raw)
    written = {entry.domain: entry.version for entry in proto.opset_import}.get("")
    if written != opset:
        raise ConfigError(
            f"export.onnx_opset={opset} was asked for, but torch.onnx {torch.__version__} wrote opset {written} "
            f"(it converts only to the opsets it supports), so {path} was not written. Expected the file to have "
            f"the opset asked for. Fix: export.onnx_opset={written}, which this torch version writes."
        )
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    atomic_write(Path(path), lambda f: f.write(data))
    return Path(path)


def onnx_session(path: Path) -> object:
    """An onnxruntime CPU session using as many threads as torch does, so timings compare like for like."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: object, images: torch.Tensor) -> torch.Tensor:
    """Logits from an onnxruntime session for a batch of normalized images."""
    array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
    return torch.from_numpy(session.run([OUTPUT], {INPUT: array})[0])  # type: ignore[attr-defined]

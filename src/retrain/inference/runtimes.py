"""Run any exported file (or the eager model) the way its users will: one call, logits for a batch.

The format is recognised by content, not by suffix: `.pt2` is used both by torch.export archives and by
AOTInductor packages, and TorchScript files often end in `.pt` like checkpoints do.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from retrain.errors import ArtifactError
from retrain.inference.deploy_info import EXTRA_FILE, DeployInfo, from_props

# Formats that export.py writes, with their file names inside the exports folder.
FILE_NAMES = {
    "torchscript": "model.torchscript.pt",
    "export": "model.pt2",
    "onnx": "model.onnx",
    "int8": "model.int8.pt2",
}


@dataclass
class Runtime:
    """A loaded model: `predict` maps normalized images (N, 3, H, W) to logits; `info` has classes and preprocessing."""

    kind: str  # eager | torchscript | export | onnx | int8
    predict: Callable[[torch.Tensor], torch.Tensor]
    info: DeployInfo
    path: Path | None = None


def detect_kind(path: Path) -> str | None:
    """Which exported format a file is in, or None when it is not an export (e.g. a checkpoint)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any("/data/aotinductor/" in name for name in names):
        return "int8"
    if any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in names):
        return "torchscript"
    if any(name.endswith("/archive_format") for name in names) and any("/models/" in n for n in names):
        return "export"
    return None


def eager_runtime(model: nn.Module, info: DeployInfo) -> Runtime:
    """The float model in plain PyTorch, the reference every export is compared with."""
    model.eval()

    def predict(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(images)

    return Runtime("eager", predict, info)


def load_runtime(path: Path) -> Runtime:
    """Load an exported file with the runtime of its format (torch or onnxruntime alone)."""
    path = Path(path)
    kind = detect_kind(path)
    loaders = {"onnx": _load_onnx, "torchscript": _load_torchscript, "export": _load_program, "int8": _load_int8}
    if kind is None:
        raise ArtifactError(
            f"{path} is not an exported model retrain can run. Expected a .onnx file, a TorchScript file or a "
            ".pt2 written by `python export.py`. Fix: point to a file in an exports/ folder, or to a checkpoint."
        )
    try:
        runtime = loaders[kind](path)
    except ArtifactError:
        raise
    except Exception as e:  # each runtime raises its own types for damaged files
        raise ArtifactError(
            f"{path} looks like a {kind} export but could not be loaded ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}). Expected a complete file written by "
            "`python export.py` with this torch version. Fix: export it again from its checkpoint."
        ) from None
    runtime.path = path
    runtime.predict = _checked_classes(runtime.predict, runtime.info, path)
    return runtime


def _checked_classes(
    call: Callable[[torch.Tensor], torch.Tensor], info: DeployInfo, path: Path
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`call`, refusing logits whose count differs from the class names the file's metadata gives them."""

    def predict(images: torch.Tensor) -> torch.Tensor:
        logits = call(images)
        if logits.ndim != 2 or logits.shape[1] != len(info.class_names):
            raise ArtifactError(
                f"{path} gives logits of shape {tuple(logits.shape)} for {len(images)} images, but the "
                f"class_names in its metadata list {len(info.class_names)} classes, so its labels cannot be "
                f"trusted. Expected shape ({len(images)}, {len(info.class_names)}): one class name per output. "
                "Fix: export it again from its checkpoint (python export.py ckpt_path=SOURCE)."
            )
        return logits

    return predict


def _load_onnx(path: Path) -> Runtime:
    from retrain.export.onnx import onnx_session, run_onnx

    session = onnx_session(path)
    props = dict(session.get_modelmeta().custom_metadata_map)  # type: ignore[attr-defined]
    return Runtime("onnx", lambda images: run_onnx(session, images), from_props(props, path))


def _no_grad(call: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def predict(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return call(images)

    return predict


def _load_torchscript(path: Path) -> Runtime:
    extra = {EXTRA_FILE: ""}
    with warnings.catch_warnings():
        # torch.jit is deprecated (FutureWarning on every call); users asked for this format knowingly.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return Runtime("torchscript", _no_grad(module), _props_file(extra[EXTRA_FILE], path))


def _load_program(path: Path) -> Runtime:
    extra = {EXTRA_FILE: ""}
    module = torch.export.load(str(path), extra_files=extra).module()
    return Runtime("export", _no_grad(module), _props_file(extra[EXTRA_FILE], path))


def _load_int8(path: Path) -> Runtime:
    package = torch._inductor.aoti_load_package(str(path))
    # Compiled for contiguous inputs, and it does not check: other strides give wrong logits silently.
    return Runtime(
        "int8", _no_grad(lambda images: package(images.contiguous())), from_props(package.get_metadata(), path)
    )


def _props_file(text: str | bytes, path: Path) -> DeployInfo:
    return from_props(json.loads(text) if text else {}, path)

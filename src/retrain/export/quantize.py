"""int8 for the CPU: PT2E quantization (torchao) to oneDNN int8 kernels, packaged with AOTInductor.

Decisions, from what torch 2.14 offers:
- `torch.ao.quantization` (eager and FX modes) is deprecated; PT2E quantization now lives in torchao
  (`torchao.quantization.pt2e`). The graph is captured with `torch.export(strict=True)`, which torchao's
  x86 lowering requires for ResNets, annotated by `X86InductorQuantizer` (per-channel int8 weights, int8
  activations), calibrated (PTQ) or fine-tuned with fake quantization (QAT), then converted.
- A converted PT2E graph runs q/dq reference ops: in eager it is ~10x *slower* than float. Its speed comes
  from Inductor, which fuses them into oneDNN int8 convolutions. AOTInductor does that once, at export time,
  and packages the compiled model as a `.pt2` that `torch._inductor.aoti_load_package` runs with torch alone
  (no torchao, no compiler, no retrain). The package is compiled for this CPU's instruction set and torch
  version: export again on a machine of the kind that will run it.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.fx import GraphModule

from retrain.errors import ConfigError
from retrain.export.program import batch_dim

# State-dict keys of the observers and fake quantizers PT2E inserts (activation_post_process_<n>.*).
OBSERVER_PREFIX = "activation_post_process_"


def x86_quantizer(*, is_qat: bool) -> object:
    """torchao's quantizer for x86 CPUs, with the reduced range older CPUs without VNNI need for accuracy."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    # Private, but the only switch torch offers for VNNI; without VNNI int8 products can saturate.
    reduce_range = not torch.cpu._is_vnni_supported()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=is_qat, reduce_range=reduce_range))
    return quantizer


def _capture(model: nn.Module, example: torch.Tensor) -> GraphModule:
    program = torch.export.export(model, (example,), dynamic_shapes=(batch_dim(),), strict=True)
    return program.module()


def quantize_ptq(model: nn.Module, calibration: Iterable[torch.Tensor], example: torch.Tensor) -> GraphModule:
    """Post-training int8: observe activation ranges on calibration batches, then convert."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(_capture(copy.deepcopy(model).eval(), example), x86_quantizer(is_qat=False))
    seen = 0
    with torch.no_grad():
        for images in calibration:
            prepared(images)
            seen += len(images)
    if seen == 0:
        raise ConfigError(
            "int8 calibration got no images. Expected export.calib_images > 0 and a train split with images. "
            "Fix: set export.calib_images=256 (or fewer) and check data.root."
        )
    return convert_pt2e(prepared)


def prepare_qat(model: nn.Module, example: torch.Tensor) -> GraphModule:
    """Insert fake quantization for quantization-aware training; the result trains like the float model.

    Its state_dict hides the fake quantizers' state, so checkpoints and published weights keep plain
    torchvision keys; loading such a state_dict keeps the quantizers' current ranges, which keep adapting
    while training goes on.
    """
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    prepared = prepare_qat_pt2e(_capture(model.train(), example), x86_quantizer(is_qat=True))
    # Lightning calls .train()/.eval(); this makes them switch the graph's BatchNorm (torchao's way).
    allow_exported_model_train_eval(prepared)
    observer_keys = [key for key in prepared.state_dict() if key.startswith(OBSERVER_PREFIX)]
    prepared.register_state_dict_post_hook(_drop_observers)
    prepared.register_load_state_dict_pre_hook(functools.partial(_keep_observers, observer_keys))
    return prepared


def _drop_observers(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, local_metadata: object
) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + OBSERVER_PREFIX)]:
        del state_dict[key]


def _keep_observers(
    keys: list[str], module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: object
) -> None:
    for key in keys:
        if prefix + key not in state_dict:
            state_dict[prefix + key] = module.get_buffer(key).detach().clone()


def convert_qat(prepared: GraphModule) -> GraphModule:
    """The int8 model of a QAT-trained graph (a copy: the trained graph stays usable)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    model = copy.deepcopy(prepared)
    move_exported_model_to_eval(model)
    return convert_pt2e(model)


def save_int8(converted: GraphModule, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> Path:
    """Compile the int8 graph with AOTInductor into one `.pt2` package that carries `metadata`."""
    program = torch.export.export(converted, (example,), dynamic_shapes=(batch_dim(),), strict=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compiled in a hidden folder beside the target and moved into place, so a failure never leaves half a
    # package. The package's inner folder takes the file's name, hence the same name in the temp folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(
                program,
                package_path=str(staging / path.name),
                # freezing folds the weights so Inductor can prepack them for oneDNN's int8 kernels.
                inductor_configs={"freezing": True, "aot_inductor.metadata": metadata},
            )
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path

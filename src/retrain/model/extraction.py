"""Forward passes over a whole split without gradients (the feature cache, BatchNorm adaptation), as fast as the
device allows: eval transforms and the fast decoder through loader workers, big batches, NHWC and native bf16.

Measured on a 2-core AMD EPYC (Zen 5, AVX512_BF16), ResNet18 at 224 px, batch 64, inference mode, images/s:
fp32 NCHW 11.3, fp32 NHWC 12.7, bf16 NCHW 11.5, bf16 NHWC 26.0 (the machine shared with other jobs: the ratios
count, not the figures). Batch 16: 19.8, 32: 24.7, 64 and 128: 30.5 in bf16 NHWC.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sized
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.models import ResNet

from retrain.data.datamodule import ImageFolderDataModule, ImageListDataset, decode_request
from retrain.errors import ConfigError
from retrain.model.onednn import onednn_supports, onednn_trunk, onednn_usable
from retrain.utils.hydra import cpu_precision

PRECISIONS = ("auto", "bf16", "fp32")
# Extraction batches: the throughput above stops growing at 64 images; a smaller eval batch size is not raised.
MIN_BATCH = 64


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 natively (AVX512_BF16/AMX CPUs, Ampere+ GPUs); emulated bf16 is slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_precision() == "bf16-mixed"


def extraction_dtype(setting: object, device: torch.device) -> torch.dtype | None:
    """What `model.feature_cache_precision` means on this device: bfloat16 (autocast), float32 (no autocast), or
    None for the Trainer's own precision.

    auto: bf16 where the device has it natively (the head's accuracy is the same as with fp32 features, see
    bench/frozen_head.py), else the Trainer's precision; bf16: always; fp32: never, whatever the Trainer's precision.
    """
    text = str(setting).lower()
    if text not in PRECISIONS:
        raise ConfigError(
            f"model.feature_cache_precision={setting!r}; expected one of {', '.join(PRECISIONS)}. "
            "Fix: model.feature_cache_precision=auto (bf16 where the CPU or GPU has it natively) or fp32."
        )
    if text == "bf16" or (text == "auto" and native_bf16(device)):
        return torch.bfloat16
    return torch.float32 if text == "fp32" else None


def onednn_dtype(dtype: torch.dtype | None, device: torch.device, trainer_precision: str) -> torch.dtype | None:
    """The dtype a pass runs the oneDNN trunk in (model/onednn.py), or None where it stays in eager mode.

    `dtype` is `extraction_dtype`'s answer; None there means the Trainer's precision, which the trunk can take when
    it is plain fp32. Elsewhere (GPUs, fp16, a CPU build without oneDNN) the pass runs the model as it is.
    """
    if dtype is None and trainer_precision in ("32-true", "32"):
        dtype = torch.float32
    return dtype if onednn_usable(device, dtype) else None


def split_pass(model: nn.Module, setting: object, trainer: Any, *, fold_bn: bool) -> tuple[ResNet | None, Any]:
    """How a pass over a split runs: the oneDNN trunk to call (None: the model itself, in eager mode) and the
    context to run it in (autocast or the Trainer's precision in eager mode; the trunk has its dtype built in).

    `setting` is `model.feature_cache_precision`; fold_bn as in `onednn_trunk`.
    """
    device = next(model.parameters()).device
    dtype = extraction_dtype(setting, device)
    fast = onednn_dtype(dtype, device, str(trainer.precision))
    if fast is not None and onednn_supports(model):
        return onednn_trunk(model, fast, fold_bn=fold_bn), contextlib.nullcontext()
    return None, forward_context(dtype, device, trainer.precision_plugin.forward_context)


def forward_context(dtype: torch.dtype | None, device: torch.device, fallback: Callable[[], Any]) -> Any:
    """Autocast to bf16, plain fp32 (autocast off), or `fallback()` (the Trainer's precision context) for None."""
    if dtype is None:
        return fallback()
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def eval_dataset(images: ImageFolderDataModule, split: str) -> ImageListDataset:
    """`split`'s images with the eval transforms and the eval decode size (the train split too: no augmentation)."""
    dataset = images.dataset(split)
    if split == "train" and images.augment != "none":
        min_size, margin = decode_request(images.preprocessing, "none", split)
        cache = images.decode_cache
        dataset = ImageListDataset(
            dataset.samples, images.eval_transform, min_size if images.fast_decode else None, margin, cache
        )
    return dataset


def extraction_batch_size(images: ImageFolderDataModule) -> int:
    """The eval batch size, raised to MIN_BATCH: no gradients are kept, so bigger batches cost little memory."""
    return max(images.eval_batch_size, MIN_BATCH)


def batch_ranges(count: int, batch_size: int) -> list[range]:
    """Consecutive index ranges of `batch_size`, a lone leftover image joining the batch before it.

    A batch of one image cannot be normalized in train mode (the BatchNorm adaptation) at 32 px or less, where the
    last stage holds one value per channel; 65 training images would otherwise crash the pass.
    """
    starts = list(range(0, count, batch_size))
    if len(starts) > 1 and count - starts[-1] == 1:
        starts.pop()
    return [range(start, end) for start, end in zip(starts, [*starts[1:], count], strict=True)]


def image_batches(
    dataset: Dataset,
    device: torch.device,
    *,
    batch_size: int,
    num_workers: int,
    indices: list[int] | None = None,
    channels_last: bool = True,
) -> Iterator[torch.Tensor]:
    """`dataset`'s images (or those at `indices`) in order, in batches on `device`, decoded by loader workers.

    channels_last: NHWC, for eager mode. The oneDNN trunk takes the loader's NCHW, which it converts fastest.
    """
    source = dataset if indices is None else Subset(dataset, indices)
    batches = [list(batch) for batch in batch_ranges(len(cast(Sized, source)), batch_size)]
    loader = DataLoader(source, batch_sampler=batches, num_workers=num_workers, pin_memory=device.type == "cuda")
    for batch, _ in loader:
        batch = batch.to(device, non_blocking=True)
        # Channels-last images take the faster eager convolution kernels (oneDNN, cuDNN with 16-bit types); the
        # results match the NCHW pass within float rounding (~1e-6 in fp32).
        yield batch.contiguous(memory_format=torch.channels_last) if channels_last else batch

"""BatchNorm statistics adapted to the new images (AdaBN, Li et al. 2016), so a frozen backbone survives a shift.

A frozen stage's BatchNorm normalizes with the statistics it was pretrained with. When the new images differ (another
resolution, X-rays instead of photos), those statistics no longer fit the activations and the features collapse.
`model.bn_stats=adapt` re-estimates them once, before training, from one pass over the training split with the eval
transforms; then they stay fixed (eval mode), so the frozen-feature cache stays exact. The statistics are pooled over
every image, not averaged per batch, and under DDP over every rank's shard: all ranks end with identical buffers.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from retrain.data.datamodule import ImageFolderDataModule
from retrain.errors import ConfigError
from retrain.model.extraction import eval_dataset, extraction_batch_size, image_batches, split_pass
from retrain.model.resnet import stage_of

log = logging.getLogger("retrain")

SETTINGS = ("auto", "frozen", "adapt", "train")


def resolve_bn_stats(setting: object, *, train_bn: bool) -> str:
    """What `model.bn_stats` does for frozen stages: `frozen`, `adapt` or `train`; auto picks adapt.

    auto is adapt because adapting never lost in our measurements and wins big across a resolution or domain shift
    (README, "Head-only transfer"); with `model.train_bn=true` BatchNorm trains anyway, so auto is `train` then.
    """
    text = str(setting).lower()
    if text not in SETTINGS:
        raise ConfigError(
            f"model.bn_stats={setting!r}; expected one of {', '.join(SETTINGS)}. Fix: model.bn_stats=auto (adapt "
            "the frozen stages' BatchNorm statistics to the new images once), frozen (keep the pretrained ones) or "
            "train (update them every batch, as a model in train mode does)."
        )
    if train_bn and text in ("frozen", "adapt"):
        raise ConfigError(
            f"model.train_bn=true trains the frozen stages' BatchNorm, which updates its statistics every batch, "
            f"but model.bn_stats={text} asks to keep them fixed. Fix: drop one of the two settings."
        )
    if text == "auto":
        return "train" if train_bn else "adapt"
    return text


def batchnorms_of(model: nn.Module, stages: Iterable[str]) -> dict[str, _BatchNorm]:
    """The BatchNorm layers of `stages`, by name, in network order."""
    wanted = set(stages)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and module.track_running_stats and stage_of(name) in wanted
    }


class _PooledMoments:
    """Per-channel sums of x and x^2, and the count of values, that one BatchNorm saw: float64, exact to add up.

    Read from the BatchNorm's own batch statistics: in train mode with momentum 1 its running buffers hold, after each
    batch, that batch's mean and unbiased variance, which give back the batch's sums. That costs nothing; computing
    the moments again from the input took a third of the pass (73 -> 49 images/s, ResNet18 at 224 px, bf16).
    """

    def __init__(self, channels: int) -> None:
        self.sums = torch.zeros(2 * channels + 1, dtype=torch.float64)  # sum x, sum x^2, count

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> None:
        bn = cast(_BatchNorm, module)
        assert bn.running_mean is not None and bn.running_var is not None  # track_running_stats (batchnorms_of)
        count = inputs[0].numel() // inputs[0].shape[1]
        mean, var = bn.running_mean.to("cpu", torch.float64), bn.running_var.to("cpu", torch.float64)
        squares = var * (count - 1) + mean * mean * count  # unbiased variance back to the sum of squares
        self.sums += torch.cat([mean * count, squares, mean.new_tensor([count])])


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks of a torch.distributed job (nothing to do in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        backend = torch.distributed.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        reduced = values.to(device)
        torch.distributed.all_reduce(reduced)
        return reduced.cpu()
    return values


def _single_image_pass(model: nn.Module, batch: torch.Tensor, moments: Iterable[_PooledMoments]) -> bool:
    """Pass a one-image batch; False, with no moments added, where train-mode BatchNorm cannot normalize it.

    One image gives a BatchNorm one value per channel once the map is 1x1 (a ResNet's last stage at 32 px), which
    train mode refuses. `image_batches` makes such a batch only for a rank whose whole shard is one image.
    """
    moments = list(moments)
    before = [m.sums.clone() for m in moments]
    try:
        model(batch)
    except ValueError as error:
        if "Expected more than 1 value per channel" not in str(error):
            raise
        for m, sums in zip(moments, before, strict=True):
            m.sums.copy_(sums)  # the layers before the 1x1 one saw the image: take it back from them too
        return False
    return True


@torch.no_grad()
def adapt_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor], stages: Iterable[str]) -> int:
    """Re-estimate the running mean and variance of `stages`' BatchNorms on `batches`; returns the images seen.

    One pass in train mode (each layer normalizes with its batch's statistics, as AdaBN does), with every batch's
    per-channel moments pooled over all images: the same result however the images are batched or sharded. Under
    torch.distributed each rank passes its own shard (any number of batches) and the sums are added up, so all ranks
    get the same buffers.
    The other BatchNorms keep their buffers, and every module its train/eval mode. A batch of a single image too
    small to normalize (see `_single_image_pass`) is skipped.
    """
    adapted = batchnorms_of(model, stages)
    if not adapted:
        return 0
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = {m: {k: b.clone() for k, b in m.named_buffers()} for m in bns}
    modes = {m: m.training for m in model.modules()}
    moments = {name: _PooledMoments(bn.num_features) for name, bn in adapted.items()}
    momenta = {bn: bn.momentum for bn in adapted.values()}
    for bn in adapted.values():
        bn.momentum = 1.0  # the running buffers take each batch's statistics, which the hook reads
    # SyncBatchNorm (trainer.sync_batchnorm under DDP) would gather every batch's statistics from all ranks: statistics
    # of other ranks' images, and a hang when the ranks' shards have different numbers of batches. Each rank uses its
    # own batches here; the all-reduce below pools the moments once.
    synced = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    for bn in synced:
        bn.forward = functools.partial(_BatchNorm.forward, bn)  # type: ignore[method-assign]
    hooks = [bn.register_forward_hook(moments[name]) for name, bn in adapted.items()]
    seen = torch.zeros(2, dtype=torch.float64)  # images, batches
    try:
        model.train()
        for batch in batches:
            if len(batch) > 1:
                model(batch)
            elif not _single_image_pass(model, batch, moments.values()):
                continue
            seen += torch.tensor([len(batch), 1], dtype=torch.float64)
    finally:
        for hook in hooks:
            hook.remove()
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for bn in synced:
            del bn.forward
        for module, training in modes.items():
            module.training = training
        for module, buffers in saved.items():  # train mode moved every BatchNorm's running statistics
            for key, value in buffers.items():
                getattr(module, key).copy_(value)
    totals = _all_reduce(torch.cat([seen, *(m.sums for m in moments.values())]))
    offset = len(seen)
    for bn in adapted.values():
        c = bn.num_features
        first, second, count = totals[offset : offset + c], totals[offset + c : offset + 2 * c], totals[offset + 2 * c]
        offset += 2 * c + 1
        if count < 2:
            continue
        mean = first / count
        var = (second / count - mean * mean).clamp_min(0) * (count / (count - 1))  # unbiased, as BatchNorm keeps it
        for buffer, value in ((bn.running_mean, mean), (bn.running_var, var)):
            if buffer is not None:  # always, with track_running_stats
                buffer.copy_(value.to(buffer.dtype))
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(int(totals[1]))
    return int(totals[0])


class BatchNormAdaptation(Callback):
    """`model.bn_stats=adapt`: when fit starts, adapt the frozen stages' BatchNorm statistics to the training images.

    It runs before any loader is built, so the feature cache computes its features with the adapted statistics (they
    are part of the backbone digest it checks). Only the stages frozen at that moment are adapted: under progressive
    unfreezing, the stages that train later learn their statistics as they train. A resumed run does not adapt
    again: its checkpoint holds the adapted statistics, and this callback's state how many images they came from.

    >>> BatchNormAdaptation(max_images=128).summary()
    {'setting': 'adapt', 'images': None, 'stages': [], 'seconds': 0.0, 'resumed': False}
    """

    def __init__(self, *, max_images: int | None = None, precision: str = "auto", seed: int = 0) -> None:
        if max_images is not None and (isinstance(max_images, bool) or int(max_images) < 1):
            raise ConfigError(
                f"model.bn_adapt_images={max_images!r}; expected a number of images >= 1, or null for every "
                "training image. Fix: e.g. model.bn_adapt_images=128."
            )
        self.max_images = None if max_images is None else int(max_images)
        self.precision = precision
        self.seed = seed
        self.images: int | None = None  # None until adapted (here or in the run this one resumes)
        self.stages: list[str] = []
        self.seconds = 0.0
        self.resumed = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Adapt once, on this rank's shard of the training images; record what was done in the module's metadata."""
        if self.images is None and trainer.ckpt_path is None:
            self._adapt(trainer, pl_module)
        elif trainer.ckpt_path is not None:
            self.resumed = True
        metadata = getattr(pl_module, "metadata", None)
        if isinstance(metadata, dict):
            metadata["bn_stats"] = self.summary()

    def _adapt(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.get_submodule("model")
        self.stages = frozen_backbone(getattr(pl_module, "frozen", []))
        data = getattr(trainer, "datamodule", None)
        images = getattr(data, "images", data)  # the image DataModule, also behind the feature cache's
        if not isinstance(images, ImageFolderDataModule):
            raise TypeError(f"BatchNormAdaptation reads an ImageFolderDataModule's train split, not {images!r:.60}")
        dataset = eval_dataset(images, "train")
        indices = list(range(len(dataset)))
        if self.max_images is not None and len(indices) > self.max_images:  # a seeded sample, the same on every rank
            generator = torch.Generator().manual_seed(self.seed)
            indices = sorted(torch.randperm(len(indices), generator=generator)[: self.max_images].tolist())
        shard = indices[trainer.global_rank :: trainer.world_size]
        start = time.perf_counter()
        # The trunk shares the model's BatchNorm modules: the pass updates their statistics.
        trunk, context = split_pass(model, self.precision, trainer, fold_bn=False)
        with context:
            batches = image_batches(
                dataset,
                pl_module.device,
                batch_size=extraction_batch_size(images),
                num_workers=images.num_workers,
                indices=shard,
                channels_last=trunk is None,
            )
            self.images = adapt_bn_stats(model if trunk is None else trunk, batches, self.stages)
        self.seconds = time.perf_counter() - start
        if not self.images and batchnorms_of(model, self.stages) and trainer.is_global_zero:
            log.warning(
                "model.bn_stats=adapt: no training image could be used (one image, too small for train-mode "
                "BatchNorm): the pretrained statistics are kept, as with model.bn_stats=frozen. Fix: more training "
                "images, or a larger data.image_size."
            )
        log.info(
            "model.bn_stats=adapt: BatchNorm statistics of %s re-estimated on %d training images in %.1f s",
            ", ".join(self.stages) or "no stage",
            self.images,
            self.seconds,
        )

    def summary(self) -> dict[str, Any]:
        """What results.json and the artifact metadata record: the setting, the images used, the stages, the time."""
        return {
            "setting": "adapt",
            "images": self.images,
            "stages": self.stages,
            "seconds": round(self.seconds, 3),
            "resumed": self.resumed,
        }

    def state_dict(self) -> dict[str, Any]:
        """How the statistics in the checkpoint were adapted, so a resumed run reports it and does not adapt again."""
        return {"images": self.images, "stages": self.stages, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the adaptation record of the run being resumed."""
        self.images = state_dict.get("images")
        self.stages = list(state_dict.get("stages", []))
        self.seconds = float(state_dict.get("seconds", 0.0))


def frozen_backbone(frozen: Iterable[str]) -> list[str]:
    """The frozen stages that hold BatchNorms (all but fc)."""
    return [stage for stage in frozen if stage != "fc"]


def bn_stats_record(model_cfg: Any, frozen: list[str]) -> dict[str, Any]:
    """What the artifact metadata says about `model.bn_stats` before fit (adapting adds the images it used)."""
    setting = resolve_bn_stats(model_cfg.bn_stats, train_bn=bool(model_cfg.train_bn))
    return {"setting": setting, "stages": frozen_backbone(frozen)}


def adaptation_for(model_cfg: Any, frozen: list[str], *, seed: int) -> BatchNormAdaptation | None:
    """The callback that adapts the frozen stages' statistics when `model.bn_stats` resolves to adapt, else None."""
    if bn_stats_record(model_cfg, frozen)["setting"] != "adapt" or not frozen_backbone(frozen):
        return None
    return BatchNormAdaptation(
        max_images=model_cfg.bn_adapt_images, precision=str(model_cfg.feature_cache_precision), seed=seed
    )

"""The frozen-feature cache: when the backbone cannot change, compute each image's pooled features once.

It is exact only when every stage before fc is frozen with BatchNorm in eval mode (`model.train_bn=false`, and
`model.bn_stats` frozen or adapt: adapted statistics are computed once, before the features), the train transforms
are deterministic (`data.augment=none`) and no stage unfreezes later: then an image's feature vector is the same in
every epoch, and training fc on stored vectors is the computation the whole network would do. Train, val and test
batches all go through the same path: (features, label) -> fc. The features are extracted in bf16 where the device
has it natively (`model.feature_cache_precision`), channels-last, in big batches, through the loader workers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models import ResNet

from retrain.data.datamodule import ImageFolderDataModule, ImageListDataset, TrainLoader
from retrain.errors import ConfigError
from retrain.model.bn_adapt import resolve_bn_stats
from retrain.model.extraction import extraction_batch_size, extraction_dtype, image_batches, split_pass
from retrain.model.surgery import BACKBONE

log = logging.getLogger("retrain")

MODES = ("auto", "true", "false")
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def cache_blockers(
    *,
    frozen: list[str],
    train_bn: bool,
    augment: str,
    unfreezes_later: bool,
    mixes_batches: bool = False,
    bn_stats: str = "frozen",
) -> list[str]:
    """Why the backbone's features could differ between epochs; empty when caching them is exact."""
    reasons = []
    trainable = [stage for stage in BACKBONE if stage not in frozen]
    if trainable:
        reasons.append(f"model.freeze leaves {', '.join(trainable)} trainable (needs model.freeze=true)")
    if "fc" in frozen:
        reasons.append("model.freeze freezes fc too, so there is no head to train")
    if train_bn:
        reasons.append("model.train_bn=true keeps updating BatchNorm (needs false)")
    elif bn_stats == "train":
        reasons.append("model.bn_stats=train updates BatchNorm statistics every batch (needs auto, adapt or frozen)")
    if augment != "none":
        reasons.append(f"data.augment={augment} changes every image every epoch (needs none)")
    if mixes_batches:
        reasons.append("data.mixup_alpha/cutmix_alpha blend the images of every batch anew (needs both 0)")
    if unfreezes_later:
        reasons.append("callbacks.unfreeze unfreezes backbone stages later in the run")
    return reasons


def use_feature_cache(mode: object, blockers: list[str]) -> bool:
    """Decide whether to cache: `auto` when nothing blocks it; `true` insists, and says why when it cannot."""
    text = str(mode).lower()  # Hydra turns true/false into booleans
    if text not in MODES:
        raise ConfigError(
            f"model.feature_cache={mode!r}; expected one of {', '.join(MODES)}, e.g. model.feature_cache=auto."
        )
    if text == "true" and blockers:
        raise ConfigError(
            "model.feature_cache=true, but the backbone's features would change between epochs: "
            f"{'; '.join(blockers)}. "
            "Fix: model.freeze=true model.train_bn=false data.augment=none and no unfreeze schedule, or "
            "model.feature_cache=auto, which caches exactly when that holds."
        )
    return text == "true" or (text == "auto" and not blockers)


def feature_cache_for(
    model_cfg: Any,
    *,
    frozen: list[str],
    augment: str,
    unfreezes_later: bool,
    directory: Path,
    mixes_batches: bool = False,
) -> tuple[FeatureCache | None, list[str]]:
    """The cache `model.feature_cache*` asks for (None when off), and what keeps it off."""
    train_bn = bool(model_cfg.train_bn)
    blockers = cache_blockers(
        frozen=frozen,
        train_bn=train_bn,
        augment=augment,
        unfreezes_later=unfreezes_later,
        mixes_batches=mixes_batches,
        bn_stats=resolve_bn_stats(model_cfg.get("bn_stats", "auto"), train_bn=train_bn),
    )
    if not use_feature_cache(model_cfg.feature_cache, blockers):
        return None, blockers
    cache = FeatureCache(
        directory,
        dtype=str(model_cfg.feature_cache_dtype),
        max_memory_mb=float(model_cfg.feature_cache_memory_mb),
        precision=str(model_cfg.get("feature_cache_precision", "auto")),
    )
    return cache, []


def pooled_features(model: ResNet, images: torch.Tensor) -> torch.Tensor:
    """What a torchvision ResNet's fc sees: its forward pass up to the global average pool, flattened."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(x), 1)


def weights_digest(model: nn.Module, *, skip: str | None = None) -> str:
    """SHA-256 of every parameter and buffer (except names starting with `skip`), to compare weights bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if skip is None or not name.startswith(skip):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _backbone_checksum(model: nn.Module) -> torch.Tensor:
    """A cheap per-tensor float64 sum, to notice at each epoch start that something changed the backbone."""
    sums = [t.detach().sum(dtype=torch.float64) for n, t in model.state_dict().items() if not n.startswith("fc.")]
    return torch.stack(sums).cpu()


def images_identity(dataset: ImageListDataset) -> str:
    """A hash of the images (path, label, size, mtime) and how they are decoded and transformed: what cached
    features stand for."""
    decoding = getattr(dataset.load, "keywords", None)  # the partial's arguments, e.g. JPEG draft size
    digest = hashlib.sha256(f"{dataset.transform!r}\0{decoding!r}".encode())
    for path, label in dataset.samples:
        stat = os.stat(path)
        digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass
class _Entry:
    """One split's features (n x dim, in memory or memory-mapped) and labels, and what they were computed from."""

    images: ImageListDataset
    identity: str
    features: torch.Tensor
    labels: torch.Tensor
    storage: str  # "memory" or the memory-mapped file
    mapped: np.memmap | None  # the file behind `features`, flushed after each build
    batch_size: int  # of the extraction pass: the image DataModule's eval batch size and workers
    num_workers: int
    seconds: float = 0.0
    builds: int = 0


class _CachedSplit(Dataset):
    """(features, label) of one split; `__getitems__` returns a whole batch at once (one gather, no collation)."""

    def __init__(self, entry: _Entry) -> None:
        self.entry = entry

    def __len__(self) -> int:
        return len(self.entry.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.entry.features[index].float(), self.entry.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.entry.features[index].float(), self.entry.labels[index]


def _resnet(pl_module: L.LightningModule) -> ResNet:
    """The torchvision ResNet a ClassifierModule trains."""
    model = getattr(pl_module, "model", None)
    if not isinstance(model, ResNet):
        raise TypeError(
            f"FeatureCache needs a LightningModule whose `model` is a torchvision ResNet, not {model!r:.60}"
        )
    return model


def _whole_batch(batch: Any) -> Any:
    """collate_fn for `_CachedSplit`: its `__getitems__` already returns a collated batch."""
    return batch


class FeatureCache(Callback):
    """Computes each split's pooled backbone features once and serves (features, label) batches to train fc.

    Features live in memory up to `max_memory_mb` (all splits together); beyond that, in a memory-mapped file of
    n x dim values under `directory`. Each split remembers its images' identity and the backbone's digest: a
    loader request for other images rebuilds it, and a changed backbone (checked cheaply at every epoch start)
    drops and recomputes every split. Under DDP every rank builds its own copy, then trains on its shard.
    """

    def __init__(
        self, directory: Path, *, dtype: str = "float32", max_memory_mb: float = 1024.0, precision: str = "auto"
    ) -> None:
        if dtype not in DTYPES:
            raise ConfigError(
                f"model.feature_cache_dtype={dtype!r}; expected one of {', '.join(DTYPES)} (float16 halves the memory)."
            )
        self.directory = Path(directory)
        self.dtype = DTYPES[dtype]
        self.max_bytes = float(max_memory_mb) * 2**20
        self.precision = precision  # of the extraction pass: auto (bf16 where native), bf16 or fp32
        self.extracted_in: str | None = None  # what `precision` meant on the device
        self.kernels: str | None = None  # how the pass ran: eager, or the oneDNN trunk (model/onednn.py)
        self.entries: dict[str, _Entry] = {}
        self.weights: str | None = None  # backbone digest the entries were computed with
        self._checksum: torch.Tensor | None = None
        self.drops = 0

    def wrap(self, images: ImageFolderDataModule) -> CachedFeatureData:
        """The DataModule to train with: `images`' splits, served as cached features."""
        return CachedFeatureData(images, self)

    def loader(self, split: str, images: ImageFolderDataModule, trainer: L.Trainer, *, shuffle: bool) -> DataLoader:
        """A loader of (features, label) batches for `split`, batched and shuffled as the image loader would be."""
        entry = self._entry(split, images, trainer)
        batch_size = images.batch_size if split == "train" else images.eval_batch_size
        sampler = images.train_sampler() if split == "train" else None  # the draws the image loader would make
        # Train: stateful like the image loader, so a checkpoint taken mid-epoch resumes at the next batch.
        return (TrainLoader if split == "train" else DataLoader)(
            _CachedSplit(entry),
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            collate_fn=_whole_batch,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Recompute every split in place if anything changed the backbone since the features were computed."""
        if self._backbone_changed(_resnet(pl_module)):
            log.warning("feature cache: the backbone changed during training; recomputing the features")
            self.drops += 1
            for entry in self.entries.values():
                self._fill(entry, trainer)

    def summary(self) -> dict[str, Any]:
        """What results.json records: the dtype and, per split, images, storage, build time and rebuilds."""
        splits = {
            name: {
                "images": len(e.labels),
                "dim": int(e.features.shape[1]),
                "storage": e.storage,
                "seconds": round(e.seconds, 3),
                "builds": e.builds,
            }
            for name, e in self.entries.items()
        }
        return {
            "enabled": True,
            "dtype": str(self.dtype).removeprefix("torch."),
            "extracted_in": self.extracted_in,
            "kernels": self.kernels,
            "splits": splits,
            "drops": self.drops,
        }

    def _entry(self, split: str, images: ImageFolderDataModule, trainer: L.Trainer) -> _Entry:
        model = _resnet(trainer.lightning_module)
        if self._backbone_changed(model):
            self.drops += bool(self.entries)
            self.entries.clear()
        dataset = images.dataset(split)
        identity = images_identity(dataset)
        entry = self.entries.get(split)
        if entry is None or entry.identity != identity:
            dim = int(model.fc.in_features)
            features, mapped = self._allocate(split, len(dataset), dim, trainer.global_rank)
            labels = torch.tensor([label for _, label in dataset.samples], dtype=torch.long)
            storage = "memory" if mapped is None else str(mapped.filename)
            batch_size = extraction_batch_size(images)
            entry = _Entry(dataset, identity, features, labels, storage, mapped, batch_size, images.num_workers)
            self.entries[split] = entry
            self._fill(entry, trainer)
        return entry

    def _backbone_changed(self, model: nn.Module) -> bool:
        """Whether the backbone differs from the one the features came from (cheap sums first, digest to confirm)."""
        checksum = _backbone_checksum(model)
        if self._checksum is not None and torch.equal(checksum, self._checksum):
            return False
        self._checksum = checksum
        digest = weights_digest(model, skip="fc.")  # the backbone the features came from, BN statistics included
        changed = self.weights is not None and digest != self.weights
        self.weights = digest
        return changed

    def _allocate(self, split: str, n: int, dim: int, rank: int) -> tuple[torch.Tensor, np.memmap | None]:
        """Room for n x dim features: in memory while the bound allows, else a file in the run directory."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        in_memory = [e.features for e in self.entries.values() if e.mapped is None]
        if sum(f.numel() * f.element_size() for f in in_memory) + n * dim * itemsize <= self.max_bytes:
            return torch.empty((n, dim), dtype=self.dtype), None
        self.directory.mkdir(parents=True, exist_ok=True)
        name = str(self.dtype).removeprefix("torch.")
        path = self.directory / f"{split}-rank{rank}-{n}x{dim}-{name}.bin"
        mapped = np.memmap(path, dtype=np.dtype(name), mode="w+", shape=(n, dim))
        return torch.from_numpy(mapped), mapped

    def _fill(self, entry: _Entry, trainer: L.Trainer) -> None:
        """Run the backbone over the split's images once, in eval mode, in bf16 where native (see extraction.py)."""
        model = _resnet(trainer.lightning_module)
        device = next(model.parameters()).device
        dtype = extraction_dtype(self.precision, device)
        self.extracted_in = "bf16" if dtype == torch.bfloat16 else "fp32" if dtype else str(trainer.precision)
        modes = {module: module.training for module in model.modules()}
        model.eval()
        trunk, context = split_pass(model, self.precision, trainer, fold_bn=True)
        self.kernels = "eager" if trunk is None else "oneDNN trunk, BatchNorm folded"
        batches = image_batches(
            entry.images,
            device,
            batch_size=entry.batch_size,
            num_workers=entry.num_workers,
            channels_last=trunk is None,
        )
        start = time.perf_counter()
        # isolate_rng: building the cache must not shift the RNG, so batches come in the order they would uncached.
        with isolate_rng(), torch.inference_mode(), context:
            offset = 0
            for images in batches:
                batch = pooled_features(model, images) if trunk is None else trunk(images)
                entry.features[offset : offset + len(batch)] = batch.to("cpu", self.dtype)
                offset += len(batch)
        for module, training in modes.items():
            module.training = training  # per module: model.train() would also flip frozen stages' BatchNorm
        if entry.mapped is not None:
            entry.mapped.flush()
        entry.seconds += time.perf_counter() - start
        entry.builds += 1
        log.info(
            "feature cache: %d images -> %d-d %s features (%s) in %.1f s",
            len(entry.labels),
            entry.features.shape[1],
            str(self.dtype).removeprefix("torch."),
            entry.storage,
            time.perf_counter() - start,
        )


class CachedFeatureData(L.LightningDataModule):
    """An image DataModule's splits as (features, label) batches from a FeatureCache: same batches, same order."""

    def __init__(self, images: ImageFolderDataModule, cache: FeatureCache) -> None:
        super().__init__()
        self.images = images
        self.cache = cache
        self.class_names = images.class_names
        self.splits = images.splits  # callbacks that score images themselves (the report) read these
        self.preprocessing = images.preprocessing
        self.augment = images.augment

    def train_dataloader(self) -> DataLoader:
        """Shuffled train features; the sampler draws the same permutation as the image loader would."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation features in file order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The test split's features, or val's when the data has no test split."""
        return self._loader("test" if "test" in self.images.splits.samples else "val", shuffle=False)

    def _loader(self, split: str, *, shuffle: bool) -> DataLoader:
        if self.trainer is None:
            raise RuntimeError("CachedFeatureData serves loaders to a Trainer: pass it as trainer.fit(datamodule=...)")
        return self.cache.loader(split, self.images, self.trainer, shuffle=shuffle)

    def describe(self) -> dict[str, Any]:
        """The dataset facts recorded in every artifact (those of the images)."""
        return self.images.describe()

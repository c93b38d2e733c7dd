"""The LightningDataModule: an ImageFolder in either layout, split once, with preset transforms."""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from retrain.artifacts.metadata import Preprocessing
from retrain.data.balance import BalancedSampler, check_sampler
from retrain.data.decode_cache import DecodedImageCache
from retrain.data.images import DRAFT_MARGIN, RANDOM_CROP_DRAFT_MARGIN, open_rgb
from retrain.data.mixing import BatchMixing
from retrain.data.splits import DataSplits
from retrain.data.transforms import MIN_CROP_SCALE, eval_transforms, preprocessing, train_transforms
from retrain.utils.ranks import every_rank, own_rank

log = logging.getLogger("retrain")


class ImageListDataset(Dataset):
    """(path, label) samples read with the project's robust RGB loader (EXIF, every colour mode, JPEG draft)."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform: Callable,
        min_size: int | None = None,
        margin: float = DRAFT_MARGIN,
        cache: DecodedImageCache | None = None,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.load = partial(cache.open_rgb if cache else open_rgb, min_size=min_size, margin=margin)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(self.load(path)), label

    def state_dict(self) -> dict[str, Any]:
        """The random state of the process that augments (a loader worker, or the main process without workers).

        StatefulDataLoader asks each worker for it after every batch and keeps the one of the last batch served, so a
        checkpoint taken mid-epoch resumes every worker's augmentation stream where it was. Tensors, tuples and ints
        only: checkpoints stay loadable with weights_only=True.
        """
        kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
        return {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), position, has_gauss, gauss),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the random streams `state_dict` recorded (StatefulDataLoader calls it in each restarted worker)."""
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        kind, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))


class TrainLoader(StatefulDataLoader):
    """The train loader: a StatefulDataLoader whose state_dict (position, sampler, each worker's random state)
    Lightning saves in every checkpoint and restores on resume, so a run stopped mid-epoch continues it exactly.

    Under DDP every rank's state goes into rank 0's checkpoint, and each rank resumes its own. A saved state it
    cannot replay (another number of processes or loader workers) is set aside with a warning, and the epoch in
    progress goes on in a fresh order, instead of failing inside torchdata.
    """

    def state_dict(self) -> dict[str, Any]:
        """This loader's position; under DDP, every rank's (a collective: every rank saves a checkpoint at once)."""
        return every_rank(super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume this rank's saved position, unless it cannot be replayed here."""
        state, mismatch = own_rank(state_dict)
        saved = saved_workers(state) if state is not None else None
        if mismatch is None and saved is not None and saved != self.num_workers:
            mismatch = f"run with {saved} loader worker(s), this run with {self.num_workers} (data.num_workers)"
        if mismatch is not None:
            log.warning(
                "The checkpoint's train loader was %s: the epoch in progress goes on in a fresh order, so this "
                "resume is not an exact replay. Fix: resume with the settings it was saved with for an exact one.",
                mismatch,
            )
            return
        super().load_state_dict(state)


def saved_workers(state: dict[str, Any]) -> int | None:
    """The number of worker processes of the loader a StatefulDataLoader state was taken from (None: no state)."""
    if "_snapshot" in state:  # torchdata's multi-process state
        return int(state["_snapshot"]["_main_snapshot"]["_num_workers"])
    return 0 if state else None


def usable_cores() -> int:
    """Cores this process may run on: the affinity mask, which containers and taskset narrow, else the count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def default_num_workers(processes: int = 1) -> int:
    """Loader workers per training process: the cores shared out, one core per process left for training."""
    return max(0, min(8, usable_cores() // max(1, processes) - 1))


def decode_request(pre: Preprocessing, augment: str, split: str) -> tuple[int, float]:
    """The shorter side a split's transforms need from a decoded image, and the margin kept above it (see open_rgb).

    Eval: the resize target, with DRAFT_MARGIN so the antialiased resize still reduces the image. Train:
    RandomResizedCrop's smallest crop must still cover the crop size; its area is at least MIN_CROP_SCALE of the
    image and its aspect ratio at most 4:3, so its shorter side is at least sqrt(scale * 3/4) times the image's
    shorter side. Random crops resample anyway, hence RANDOM_CROP_DRAFT_MARGIN.
    """
    if split != "train" or augment == "none":
        return pre.resize, DRAFT_MARGIN
    return math.ceil(pre.crop / math.sqrt(MIN_CROP_SCALE[augment] * 3 / 4)), RANDOM_CROP_DRAFT_MARGIN


class ImageFolderDataModule(L.LightningDataModule):
    """Serves the splits found by `retrain.data.splits.discover` with the eval preset and an augmentation preset."""

    def __init__(
        self,
        splits: DataSplits,
        *,
        image_size: int = 224,
        augment: str = "light",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: int | None = 2,
        fast_decode: bool = True,
        decode_cache: str | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        sampler: str = "shuffle",
        seed: int = 0,
        hflip: bool = True,
    ) -> None:
        super().__init__()
        self.splits = splits
        self.class_names = splits.class_names
        self.preprocessing = preprocessing(image_size, hflip=hflip)  # hflip=False: recorded, and no flip in training
        self.augment = augment
        self.train_transform = train_transforms(self.preprocessing, augment)
        self.eval_transform = eval_transforms(self.preprocessing)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        # None means "pick for the machine": workers from the cores (shared out among DDP processes once the
        # trainer is known), pinned memory only when batches go to a CUDA device.
        self.workers_requested = num_workers
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and self.num_workers > 0
        self.prefetch_factor = prefetch_factor
        self.fast_decode = fast_decode
        self.decode_cache = DecodedImageCache(decode_cache) if decode_cache else None
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha or 0.0, cutmix_alpha or 0.0
        mixing_on = self.mixup_alpha != 0 or self.cutmix_alpha != 0
        self.mixing = BatchMixing(len(self.class_names), self.mixup_alpha, self.cutmix_alpha) if mixing_on else None
        self.mixes_batches = self.mixing is not None
        self.sampler = check_sampler(sampler)
        self.seed = seed  # with the epoch, seeds data.sampler=balanced's draw

    def dataset(self, split: str) -> ImageListDataset:
        """The dataset of one split, with train augmentation only for `train`."""
        transform = self.train_transform if split == "train" else self.eval_transform
        min_size, margin = decode_request(self.preprocessing, self.augment, split)
        samples = self.splits.samples[split]
        return ImageListDataset(samples, transform, min_size if self.fast_decode else None, margin, self.decode_cache)

    def setup(self, stage: str) -> None:
        """Share the cores out among the DDP processes of this node, unless the user set num_workers."""
        trainer = self.trainer
        if self.workers_requested is None and trainer is not None:
            self.num_workers = default_num_workers(trainer.num_devices)

    def _pin(self) -> bool:
        if self.pin_memory is not None:
            return self.pin_memory
        trainer = self.trainer
        if trainer is not None:
            return trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def _loader(self, split: str) -> DataLoader:
        workers = self.num_workers
        dataset = self.dataset(split)
        train = split == "train"
        batch_size = self.batch_size if train else self.eval_batch_size
        loader_type = TrainLoader if train else DataLoader
        return loader_type(
            dataset,
            batch_size=batch_size,
            sampler=self.train_sampler() if train else None,
            drop_last=train and self._full_batch(len(dataset), batch_size),
            num_workers=workers,
            pin_memory=self._pin(),
            persistent_workers=self.persistent_workers and workers > 0,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            collate_fn=self.mixing if train else None,
        )

    def _full_batch(self, images: int, batch_size: int) -> bool:
        """Whether every process gets a whole batch: then a last train batch of one image, which breaks BatchNorm,
        is dropped; with fewer images than a batch the one smaller batch is kept, or there would be no step."""
        processes = self.trainer.world_size if self.trainer is not None else 1
        return images // max(1, processes) >= batch_size

    def train_sampler(self) -> DistributedSampler:
        """This rank's shard of each epoch's draw: a permutation (data.sampler=shuffle) or a class-balanced draw.

        Either is a DistributedSampler seeded from (seed, epoch), also on one device: its order depends on nothing
        but the epoch, so a resume draws the epoch it stopped in again, and StatefulDataLoader skips what was served.
        Lightning neither replaces nor wraps it under DDP, and calls its set_epoch at every epoch start.
        """
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        train = self.splits.samples["train"]
        sampler: DistributedSampler
        if self.sampler == "balanced":
            sampler = BalancedSampler([label for _, label in train], seed=self.seed, num_replicas=replicas, rank=rank)
        else:
            sampler = DistributedSampler(train, replicas, rank, shuffle=True, seed=self.seed)  # type: ignore[arg-type]
        if trainer is not None:  # Lightning draws a fit's first epoch before its set_epoch: after a resume, not 0
            progress = trainer.fit_loop.epoch_progress.current  # a _ProcessedTracker: what Lightning passes set_epoch
            sampler.set_epoch(progress.processed)  # type: ignore[attr-defined]
        return sampler

    def train_dataloader(self) -> DataLoader:
        """Shuffled (or class-balanced) train batches, seeded per epoch, so resume replays them."""
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        """Validation batches in file order."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """The test split, or val when the data has no test split."""
        return self._loader("test" if "test" in self.splits.samples else "val")

    def predict_dataloader(self) -> DataLoader:
        """Same as test: predictions over the held-out split."""
        return self.test_dataloader()

    def describe(self) -> dict[str, Any]:
        """The dataset facts and transforms recorded in every artifact."""
        mixing = {"mixup_alpha": self.mixup_alpha, "cutmix_alpha": self.cutmix_alpha} if self.mixes_batches else {}
        return {**self.splits.summary(), "augment": self.augment, **mixing}

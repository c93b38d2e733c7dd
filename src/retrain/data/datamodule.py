"""The LightningDataModule: an ImageFolder in either layout, split once, with preset transforms."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from retrain.data.images import open_rgb
from retrain.data.splits import DataSplits
from retrain.data.transforms import MIN_CROP_SCALE, eval_transforms, preprocessing, train_transforms


class ImageListDataset(Dataset):
    """(path, label) samples read with the project's robust RGB loader; the index is returned for feature caching."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, min_size: int | None = None) -> None:
        self.samples = samples
        self.transform = transform
        self.load = partial(open_rgb, min_size=min_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(self.load(path)), label


def default_num_workers() -> int:
    """Leave one core to the training process; on 2 cores that is one loader worker."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


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
    ) -> None:
        super().__init__()
        self.splits = splits
        self.class_names = splits.class_names
        self.preprocessing = preprocessing(image_size)
        self.augment = augment
        self.train_transform = train_transforms(self.preprocessing, augment)
        self.eval_transform = eval_transforms(self.preprocessing)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and self.num_workers > 0
        self.prefetch_factor = prefetch_factor if self.num_workers > 0 else None
        # JPEG draft decoding only needs the short side to cover the resize target (eval) or the smallest
        # random crop at full resolution (train).
        self.fast_decode = fast_decode

    def dataset(self, split: str) -> ImageListDataset:
        """The dataset of one split, with train augmentation only for `train`."""
        transform = self.train_transform if split == "train" else self.eval_transform
        min_size = None
        if self.fast_decode:
            scale = MIN_CROP_SCALE[self.augment] if split == "train" else 1.0
            min_size = math.ceil(self.preprocessing["resize"] / math.sqrt(scale))
        return ImageListDataset(self.splits.samples[split], transform, min_size)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled train batches; the order is seeded per epoch by the module, so resume replays it."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in file order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The test split, or val when the data has no test split."""
        return self._loader("test" if "test" in self.splits.samples else "val", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Same as test: predictions over the held-out split."""
        return self.test_dataloader()

    def describe(self) -> dict[str, Any]:
        """The dataset facts and transforms recorded in every artifact."""
        return {**self.splits.summary(), "augment": self.augment}


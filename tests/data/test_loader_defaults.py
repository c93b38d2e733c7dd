"""DataLoader settings: sane defaults from the cores (shared among DDP processes), and the user's choices kept."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from retrain.data import datamodule
from retrain.data.datamodule import ImageFolderDataModule, default_num_workers
from retrain.data.splits import discover


@pytest.mark.parametrize(
    ("cores", "processes", "workers"),
    [(1, 1, 0), (2, 1, 1), (4, 1, 3), (64, 1, 8), (16, 4, 3), (2, 2, 0)],
)
def test_workers_leave_one_core_to_each_training_process(
    monkeypatch: pytest.MonkeyPatch, cores: int, processes: int, workers: int
) -> None:
    monkeypatch.setattr(datamodule, "usable_cores", lambda: cores)
    assert default_num_workers(processes) == workers


def fake_trainer(devices: int, device: str) -> SimpleNamespace:
    root = SimpleNamespace(root_device=torch.device(device))
    fit_loop = SimpleNamespace(epoch_progress=SimpleNamespace(current=SimpleNamespace(processed=0)))  # sampler epoch
    return SimpleNamespace(num_devices=devices, world_size=devices, global_rank=0, strategy=root, fit_loop=fit_loop)


def test_defaults_follow_the_trainer_the_module_is_attached_to(
    monkeypatch: pytest.MonkeyPatch, imagefolder: Path
) -> None:
    monkeypatch.setattr(datamodule, "usable_cores", lambda: 16)
    data = ImageFolderDataModule(discover(imagefolder), image_size=32)
    data.trainer = fake_trainer(4, "cuda")  # 4 DDP processes on one node, batches go to a GPU
    data.setup("fit")
    assert data.num_workers == 3
    assert data._pin()


def test_explicit_loader_settings_reach_the_dataloader(monkeypatch: pytest.MonkeyPatch, imagefolder: Path) -> None:
    monkeypatch.setattr(datamodule, "usable_cores", lambda: 16)
    data = ImageFolderDataModule(
        discover(imagefolder),
        image_size=32,
        num_workers=2,
        pin_memory=False,
        persistent_workers=True,
        prefetch_factor=4,
    )
    data.trainer = fake_trainer(4, "cuda")
    data.setup("fit")  # the user's num_workers wins over the per-process share
    loader = data.train_dataloader()
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers, loader.prefetch_factor) == (
        2,
        False,
        True,
        4,
    )


def test_no_workers_means_no_persistent_workers_and_no_prefetch(imagefolder: Path) -> None:
    loader = ImageFolderDataModule(discover(imagefolder), image_size=32, num_workers=0).val_dataloader()
    assert (loader.num_workers, loader.persistent_workers, loader.prefetch_factor) == (0, False, None)
    assert loader.pin_memory == torch.cuda.is_available()  # no trainer attached: pin only when CUDA exists

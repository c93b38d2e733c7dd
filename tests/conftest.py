"""Shared fixtures: a tiny ImageFolder, small state dicts and a registry with published versions.

Helpers live in tests/clitools.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from clitools import make_imagefolder
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from retrain.artifacts.formats import save_safetensors, save_weights_pth
from retrain.artifacts.registry import publish, reserve_version
from retrain.utils.io import write_json


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin is set up, before xdist starts the workers
def pytest_configure(config: pytest.Config) -> None:
    """Give each xdist worker its share of the cores: more threads than cores spin against each other.

    With `-n 2` on 2 cores, every worker's torch, and every CLI subprocess it starts, would otherwise run one thread
    per core: measured on the e2e files, the suite ran about 20 % slower that way. An OMP_NUM_THREADS the caller set
    is kept.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:  # the xdist controller, or a run without -n: torch's default threads
        # Importing torchvision has already written Inductor's default folder into the environment; any other
        # folder is the caller's. Set before the workers start: they and their CLI subprocesses inherit it.
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
            factory = config._tmp_path_factory  # type: ignore[attr-defined]
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_inductor_cache(factory))
            # Inductor's precompiled headers (150 MB each) go to <temp folder>/torchinductor_<user> whatever the
            # cache folder: the workers' and subprocesses' temp folder goes beside the cache, removed with it.
            os.environ["TMPDIR"] = os.environ["TORCHINDUCTOR_CACHE_DIR"]
        return
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # inherited by the CLI subprocesses
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def _no_temp_files_after_a_green_run(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[None]:
    """Remove this session's temp folder when every test passed: module-scoped runs keep 45-90 MB checkpoints there.

    tmp_path_retention_policy=failed (pyproject) already drops each passing test's own tmp_path. torch.compile's
    kernel cache goes beside it (`pytest_configure`), instead of growing /tmp/torchinductor_<user> by about half a
    GB a run (three precompiled headers of 150 MB and the kernels); `pytest_sessionfinish` removes it.
    """
    yield
    if request.session.testsfailed == 0:
        shutil.rmtree(tmp_path_factory.getbasetemp(), ignore_errors=True)


def _inductor_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One kernel cache for all xdist workers: each new cache first compiles Inductor's CPU probes (~12 s of CPU)."""
    root = tmp_path_factory.getbasetemp()  # the controller's: the workers' are <root>/popen-gw<N>
    (root / "torchinductor").mkdir(exist_ok=True)
    return root / "torchinductor"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After a green run, the xdist controller removes the workers' shared kernel cache (each worker its own folder)."""
    if exitstatus == 0 and "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(session.config._tmp_path_factory.getbasetemp() / "torchinductor", ignore_errors=True)  # type: ignore[attr-defined]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The end-to-end files first: xdist hands out files in this order, so the longest ones no longer finish last."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)  # stable: the order within each part stays


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only split-layout ImageFolder with 3 classes, shared by the whole session."""
    return make_imagefolder(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="session")
def resnet_state() -> dict[str, torch.Tensor]:
    """A real torchvision ResNet18 state_dict (3 classes); tests must not modify it."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).state_dict()


@pytest.fixture
def small_state() -> dict[str, torch.Tensor]:
    """A tiny head-like state_dict for tests that do not need a whole ResNet."""
    generator = torch.Generator().manual_seed(0)
    return {
        "fc.weight": torch.randn(3, 4, generator=generator),
        "fc.bias": torch.randn(3, generator=generator),
        "bn1.num_batches_tracked": torch.tensor(7),
    }


def _metadata(name: str = "cats", version: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "schema": 1,
        "name": name,
        "version": version,
        "created": "2025-01-02T03:04:05+00:00",
        "arch": "resnet18",
        "num_classes": 3,
        "class_names": ["cat", "dog", "élan"],
        "preprocessing": {"image_size": 32, "resize": 36, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
        "metrics": {"val/acc": 0.75, "test/acc": 0.5},
        "parent": None,
        **extra,
    }


@pytest.fixture
def make_metadata() -> Callable[..., dict[str, Any]]:
    """Build a metadata dict shaped like the ones the training task writes."""
    return _metadata


@pytest.fixture
def publish_version(tmp_path: Path) -> Callable[..., Path]:
    """Publish a registry version holding model.safetensors, weights.pth and metadata.json."""
    model_dir = tmp_path / "models"

    def make(state: dict[str, torch.Tensor], name: str = "cats", **extra: Any) -> Path:
        reservation = reserve_version(model_dir, name)
        metadata = _metadata(name, reservation.version, **extra)
        save_safetensors(state, metadata, reservation.staging / "model.safetensors")
        save_weights_pth(state, reservation.staging / "weights.pth")
        write_json(reservation.staging / "metadata.json", metadata)
        return publish(reservation)

    return make

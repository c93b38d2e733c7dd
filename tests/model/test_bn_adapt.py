"""BatchNorm statistics adapted to new images (model.bn_stats): pooled over every image, every rank, once."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from clitools import make_imagefolder, quiet_trainer
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset

from retrain.data.datamodule import ImageFolderDataModule
from retrain.data.splits import discover
from retrain.errors import ConfigError
from retrain.model.bn_adapt import (
    BatchNormAdaptation,
    adapt_bn_stats,
    adaptation_for,
    batchnorms_of,
    resolve_bn_stats,
)
from retrain.model.extraction import batch_ranges, image_batches
from retrain.model.feature_cache import FeatureCache, pooled_features
from retrain.model.module import ClassifierModule
from retrain.model.resnet import build_resnet
from retrain.model.surgery import BACKBONE, apply_freeze


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_resnet("resnet18", 3)


def _images(n: int = 16, seed: int = 1) -> torch.Tensor:
    # Shifted and scaled away from what the fresh BatchNorms hold (mean 0, var 1), so adapting has to move them.
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 3 + 2


def _buffers(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k}


def test_settings_resolve_and_mistakes_say_the_fix() -> None:
    assert resolve_bn_stats("auto", train_bn=False) == "adapt"
    assert resolve_bn_stats("auto", train_bn=True) == "train"
    assert resolve_bn_stats("frozen", train_bn=False) == "frozen"
    with pytest.raises(ConfigError, match=r"expected one of auto, frozen, adapt, train.*Fix"):
        resolve_bn_stats("adaptive", train_bn=False)
    with pytest.raises(ConfigError, match=r"model.train_bn=true .* model.bn_stats=adapt.*Fix"):
        resolve_bn_stats("adapt", train_bn=True)
    cfg = OmegaConf.create(
        {"bn_stats": "auto", "train_bn": False, "bn_adapt_images": 8, "feature_cache_precision": "fp32"}
    )
    assert adaptation_for(cfg, list(BACKBONE), seed=0) is not None
    assert adaptation_for(cfg, ["fc"], seed=0) is None  # nothing frozen that has BatchNorm
    assert adaptation_for(OmegaConf.merge(cfg, {"bn_stats": "frozen"}), list(BACKBONE), seed=0) is None
    with pytest.raises(ConfigError, match="bn_adapt_images"):
        BatchNormAdaptation(max_images=0)


def test_statistics_are_pooled_over_every_image_and_only_frozen_stages_move() -> None:
    net, images = _net(), _images()
    net.eval()
    before = _buffers(net)
    seen = adapt_bn_stats(net, images.split(4), ["stem", "layer1"])
    assert seen == 16
    # The stem's BatchNorm sees conv1's output, which no BatchNorm changes: its statistics are those of all 16 images.
    with torch.no_grad():
        x = net.conv1(images)
    torch.testing.assert_close(net.bn1.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net.bn1.running_var, x.var(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)
    after = _buffers(net)
    adapted = {
        f"{name}.{kind}" for name in batchnorms_of(net, ["stem", "layer1"]) for kind in ("running_mean", "running_var")
    }
    assert {k for k in after if not torch.equal(after[k], before[k])} == adapted
    assert not net.training and not any(m.training for m in net.modules())  # modes as they were


def test_a_lone_leftover_image_joins_the_batch_before_it_so_small_images_adapt() -> None:
    # 65 images at 32 px in batches of 64 left one image alone, whose layer4 output (1x1) train-mode BatchNorm
    # refused: "Expected more than 1 value per channel when training".
    assert [len(r) for r in batch_ranges(65, 64)] == [65]
    assert [len(r) for r in batch_ranges(129, 64)] == [64, 65] and batch_ranges(1, 64) == [range(0, 1)]
    images = _images(65)
    dataset = TensorDataset(images, torch.zeros(65))
    batches = list(image_batches(dataset, torch.device("cpu"), batch_size=64, num_workers=0))
    assert [len(b) for b in batches] == [65] and torch.equal(batches[0], images)
    assert adapt_bn_stats(_net(), batches, BACKBONE) == 65
    # A rank whose whole shard is one 32-px image adds nothing to any layer rather than crash; the others' images set
    # the statistics. At 64 px (layer4 is 2x2) one image is enough, and counts.
    net, alone = _net(), _net()
    assert adapt_bn_stats(net, [images[:16], images[16:17]], BACKBONE) == 16
    adapt_bn_stats(alone, [images[:16]], BACKBONE)
    assert all(torch.equal(v, _buffers(alone)[k]) for k, v in _buffers(net).items())
    one, fresh = _net(), _buffers(_net())
    assert adapt_bn_stats(one, [torch.nn.functional.interpolate(images[:1], size=64)], BACKBONE) == 1
    assert all(not torch.equal(v, fresh[k]) for k, v in _buffers(one).items())


def _adapt_on_rank(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        # As trainer.sync_batchnorm=true makes it, whose per-batch gathering would hang on these uneven shards (and
        # refuses CPU tensors): rank 0 passes batches 0, 1 and 2, rank 1 only batch 3.
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_net())
        batches = _images().split(4)[:3] if rank == 0 else _images().split(4)[3:]
        seen = adapt_bn_stats(net, batches, BACKBONE)
        torch.save({"seen": seen, "buffers": _buffers(net)}, f"{out}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_pool_their_uneven_shards_into_identical_buffers_even_with_sync_batchnorm(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_adapt_on_rank, args=(str(tmp_path / "store"), str(tmp_path / "rank")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["seen"] == ranks[1]["seen"] == 16  # every rank counts the images of all ranks
    single = _net()
    adapt_bn_stats(single, _images().split(4), BACKBONE)  # one process, the same four batches
    for key, value in _buffers(single).items():
        assert torch.equal(ranks[0]["buffers"][key], ranks[1]["buffers"][key]), key
        torch.testing.assert_close(ranks[0]["buffers"][key], value, atol=1e-5, rtol=1e-5)


def _module(frozen: list[str]) -> ClassifierModule:
    net = _net()
    apply_freeze(net, frozen)
    optimizer = partial(torch.optim.SGD, momentum=0.9)
    return ClassifierModule(net, ["cat", "dog", "fox"], optimizer=optimizer, lr=0.05, frozen=frozen, seed=3)


def _trainer(callbacks: list[L.Callback], root: Path, epochs: int = 1) -> L.Trainer:
    return quiet_trainer(max_epochs=epochs, callbacks=callbacks, default_root_dir=root, num_sanity_val_steps=0)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("adapt") / "images", per_class=4)


def _data(root: Path) -> ImageFolderDataModule:
    return ImageFolderDataModule(discover(root), image_size=32, augment="none", batch_size=4, num_workers=0)


def test_fit_adapts_once_before_the_cache_and_a_resume_does_not_adapt_again(root: Path, tmp_path: Path) -> None:
    module = _module(list(BACKBONE))
    fresh = _buffers(module.model)
    adaptation = BatchNormAdaptation(max_images=10, precision="fp32")
    cache = FeatureCache(tmp_path / "cache", precision="fp32")
    trainer = _trainer([adaptation, cache], tmp_path)
    trainer.fit(module, datamodule=cache.wrap(_data(root)))
    summary = adaptation.summary()
    assert summary["images"] == 10 and summary["stages"] == list(BACKBONE) and not summary["resumed"]
    assert module.metadata["bn_stats"] == summary  # what the checkpoints and the published files carry
    adapted = _buffers(module.model)
    assert all(not torch.equal(adapted[k], fresh[k]) for k in adapted)
    # The cached features are those of the adapted backbone.
    entry = cache.entries["train"]
    images = torch.stack([entry.images[i][0] for i in range(2)])
    with torch.no_grad():
        expected = pooled_features(module.model.eval(), images)
    torch.testing.assert_close(entry.features[:2], expected, atol=1e-4, rtol=1e-4)

    checkpoint = tmp_path / "adapted.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed_module, again = _module(list(BACKBONE)), BatchNormAdaptation(max_images=10, precision="fp32")
    _trainer([again], tmp_path, epochs=2).fit(resumed_module, datamodule=_data(root), ckpt_path=checkpoint)
    assert again.summary()["images"] == 10 and again.summary()["resumed"]  # the first run's record, kept
    assert all(torch.equal(_buffers(resumed_module.model)[k], adapted[k]) for k in adapted)  # not adapted again


def test_only_the_stages_still_frozen_are_adapted(root: Path, tmp_path: Path) -> None:
    frozen = ["stem", "layer1", "layer2"]  # e.g. what an unfreeze schedule keeps frozen at epoch 0
    module = _module(frozen)
    fresh = _buffers(module.model)
    adaptation = BatchNormAdaptation(precision="fp32")
    trainer = _trainer([adaptation], tmp_path)
    trainer.limit_train_batches = trainer.limit_val_batches = 0  # fit starts (and adapts) but takes no step
    trainer.fit(module, datamodule=_data(root))
    assert adaptation.summary()["stages"] == frozen and adaptation.images == 12  # every train image: no cap
    changed = {k.split(".")[0] for k, v in _buffers(module.model).items() if not torch.equal(v, fresh[k])}
    assert changed == {"bn1", "layer1", "layer2"}  # the stem's bn1 and the two frozen layers; layer3/4 untouched


def test_an_adaptation_that_could_use_no_image_says_the_statistics_were_kept(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = _module(list(BACKBONE))
    fresh = _buffers(module.model)
    adaptation = BatchNormAdaptation(max_images=1, precision="fp32")  # one 32-px image: layer4 is 1x1
    trainer = _trainer([adaptation], tmp_path)
    trainer.limit_train_batches = trainer.limit_val_batches = 0
    with caplog.at_level("WARNING", logger="retrain"):
        trainer.fit(module, datamodule=_data(root))
    assert adaptation.images == 0 and "the pretrained statistics are kept" in caplog.text
    assert all(torch.equal(v, fresh[k]) for k, v in _buffers(module.model).items())

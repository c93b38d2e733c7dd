"""The frozen-feature cache: when it may be used, that it trains the same head, and when it is dropped."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from clitools import make_imagefolder, quiet_trainer
from omegaconf import OmegaConf

from retrain.data.datamodule import ImageFolderDataModule
from retrain.data.splits import discover
from retrain.errors import ConfigError
from retrain.model.feature_cache import (
    FeatureCache,
    cache_blockers,
    feature_cache_for,
    pooled_features,
    use_feature_cache,
)
from retrain.model.module import ClassifierModule
from retrain.model.resnet import build_resnet
from retrain.model.surgery import BACKBONE, apply_freeze

EPOCHS = 2


def test_fc_on_pooled_features_is_the_whole_forward() -> None:
    torch.manual_seed(0)
    model = build_resnet("resnet18", 3).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.fc(pooled_features(model, images)), model(images))


def test_auto_turns_on_exactly_when_nothing_blocks_it() -> None:
    valid = {"frozen": list(BACKBONE), "train_bn": False, "augment": "none", "unfreezes_later": False}
    assert cache_blockers(**valid) == []
    assert use_feature_cache("auto", []) and use_feature_cache(True, [])
    assert not use_feature_cache(False, []) and not use_feature_cache("false", [])
    for change, words in [
        ({"frozen": ["stem", "layer1"]}, "layer2, layer3, layer4 trainable"),
        ({"frozen": [*BACKBONE, "fc"]}, "no head to train"),
        ({"train_bn": True}, "model.train_bn=true"),
        ({"augment": "light"}, "data.augment=light"),
        ({"unfreezes_later": True}, "callbacks.unfreeze"),
    ]:
        blockers = cache_blockers(**{**valid, **change})
        assert len(blockers) == 1 and words in blockers[0]
        assert not use_feature_cache("auto", blockers)
        with pytest.raises(ConfigError, match=r"model\.feature_cache=true, but") as error:
            use_feature_cache(True, blockers)
        assert words in str(error.value) and "model.feature_cache=auto" in str(error.value)
    with pytest.raises(ConfigError, match="expected one of auto, true, false"):
        use_feature_cache("sometimes", [])


def test_config_keys_build_the_cache(tmp_path: Path) -> None:
    model_cfg = OmegaConf.create(
        {"train_bn": False, "feature_cache": "auto", "feature_cache_dtype": "float16", "feature_cache_memory_mb": 0}
    )
    cache, blockers = feature_cache_for(
        model_cfg, frozen=list(BACKBONE), augment="none", unfreezes_later=False, directory=tmp_path
    )
    assert cache is not None and blockers == [] and cache.dtype == torch.float16 and cache.max_bytes == 0
    off, blockers = feature_cache_for(model_cfg, frozen=[], augment="none", unfreezes_later=False, directory=tmp_path)
    assert off is None and "model.freeze" in blockers[0]
    with pytest.raises(ConfigError, match="feature_cache_dtype"):
        FeatureCache(tmp_path, dtype="int8")


def _images(root: Path) -> ImageFolderDataModule:
    return ImageFolderDataModule(discover(root), image_size=32, augment="none", batch_size=8, num_workers=0)


def _module() -> ClassifierModule:
    torch.manual_seed(0)
    net = build_resnet("resnet18", 3)
    apply_freeze(net, BACKBONE)
    optimizer = partial(torch.optim.SGD, momentum=0.9)
    return ClassifierModule(net, ["cat", "dog", "fox"], optimizer=optimizer, lr=0.05, frozen=BACKBONE, seed=3)


def _trainer(epochs: int = EPOCHS) -> L.Trainer:
    return quiet_trainer(max_epochs=epochs, deterministic=True)


def _fit(data: L.LightningDataModule) -> dict:
    module = _module()
    trainer = _trainer()
    trainer.fit(module, datamodule=data)
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    test = trainer.test(module, datamodule=data, verbose=False)[0]
    return {"module": module, "val": val, "test": test}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same head training on images, on cached float32 features and on memory-mapped float16 ones."""
    root = make_imagefolder(tmp_path_factory.mktemp("cache") / "images")
    # fp32 extraction: these runs compare the cache with the image path exactly (bf16 is measured in bench/).
    in_memory = FeatureCache(root.parent / "unused", precision="fp32")
    mapped = FeatureCache(root.parent / "mapped", dtype="float16", max_memory_mb=0, precision="fp32")
    return {
        "images": _fit(_images(root)),
        "float32": {**_fit(in_memory.wrap(_images(root))), "cache": in_memory},
        "float16": {**_fit(mapped.wrap(_images(root))), "cache": mapped},
        "root": root,
    }


def test_cached_training_gives_the_same_head_and_metrics(runs: dict) -> None:
    plain, cached = runs["images"], runs["float32"]
    fc, cached_fc = plain["module"].model.fc, cached["module"].model.fc
    assert not torch.equal(fc.weight, _module().model.fc.weight)  # the head did train
    torch.testing.assert_close(cached_fc.weight, fc.weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached_fc.bias, fc.bias, atol=1e-5, rtol=1e-4)
    assert cached["val"]["val/acc"] == plain["val"]["val/acc"]
    assert cached["val"]["val/loss"] == pytest.approx(plain["val"]["val/loss"], abs=1e-5)
    assert cached["test"]["test/acc"] == plain["test"]["test/acc"]  # test goes through the same path
    assert cached["test"]["test/loss"] == pytest.approx(plain["test"]["test/loss"], abs=1e-5)
    summary = cached["cache"].summary()
    # Every split was computed once, in memory, although fit ran several epochs, sanity checks and a test.
    assert {name: (s["builds"], s["storage"], s["dim"]) for name, s in summary["splits"].items()} == {
        "train": (1, "memory", 512),
        "val": (1, "memory", 512),
        "test": (1, "memory", 512),
    }


def test_float16_memory_mapped_cache_trains_the_same_head_within_its_precision(runs: dict) -> None:
    plain, cached = runs["images"], runs["float16"]
    torch.testing.assert_close(cached["module"].model.fc.weight, plain["module"].model.fc.weight, atol=2e-3, rtol=0)
    assert cached["val"]["val/acc"] == plain["val"]["val/acc"]
    splits = cached["cache"].summary()["splits"]
    train_file = Path(splits["train"]["storage"])
    assert train_file.parent == runs["root"].parent / "mapped"
    assert train_file.stat().st_size == 24 * 512 * 2  # 24 train images x 512 float16 values


def test_cache_is_dropped_when_the_weights_or_the_images_change(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "images", per_class=4)
    cache = FeatureCache(tmp_path / "cache", precision="fp32")
    data = cache.wrap(_images(root))
    module, trainer = _module(), _trainer()
    trainer.validate(module, datamodule=data, verbose=False)
    first = cache.entries["val"]
    features = first.features.clone()
    trainer.validate(module, datamodule=data, verbose=False)
    assert cache.entries["val"] is first and first.builds == 1  # unchanged: reused

    with torch.no_grad():
        module.model.layer1[0].conv1.weight.mul_(1.5)
    trainer.validate(module, datamodule=data, verbose=False)
    assert cache.drops == 1 and cache.entries["val"] is not first
    assert not torch.equal(cache.entries["val"].features, features)

    second = cache.entries["val"]
    image = Path(second.images.samples[0][0])
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    trainer.validate(module, datamodule=data, verbose=False)
    assert cache.entries["val"] is not second and cache.entries["val"].identity != second.identity

"""The typed schema of the `data` and `model` config groups, so Hydra rejects a wrong type while composing.

`python train.py data.batch_size=big` stops with Hydra's own error (the key, the value, the type expected)
before anything is imported or read. Each field is the key of the same name in conf/data/imagefolder.yaml or
conf/model/resnet18.yaml, whose comments say what it does; a new key goes into both. The yaml files hold the
defaults (fields here are `???` until they merge in), and `Any` marks the keys that take more than one type;
the code that reads those checks them. Registered by `retrain.utils.hydra.register_resolvers`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# OmegaConf reads these annotations at runtime and knows typing.Optional, not `X | None`.
# ruff: noqa: UP045


@dataclass
class DataConfig:
    """conf/data/*.yaml: the image folder, its split, transforms and loaders (data/datamodule.py, data/splits.py)."""

    root: Optional[str] = MISSING
    image_size: int = MISSING
    augment: str = MISSING  # none | light | strong: data/transforms.py says which
    mixup_alpha: float = MISSING
    cutmix_alpha: float = MISSING
    sampler: str = MISSING  # shuffle | balanced: data/balance.py
    hflip: bool = MISSING  # false: never mirrored (data/transforms.py mirrorable, inference/tta.py)
    batch_size: int = MISSING
    eval_batch_size: Optional[int] = MISSING
    num_workers: Optional[int] = MISSING
    pin_memory: Optional[bool] = MISSING
    persistent_workers: bool = MISSING
    prefetch_factor: Optional[int] = MISSING
    fast_decode: bool = MISSING
    decode_cache: Optional[str] = MISSING
    val_fraction: float = MISSING
    test_fraction: float = MISSING
    split_seed: int = MISSING
    folds: int = MISSING  # k-fold CV: data/folds.py
    fold: Any = MISSING  # null, a fold number or refit
    group_by: Optional[str] = MISSING
    validate: str = MISSING  # quick | full | off
    on_bad_file: str = MISSING  # error | skip
    demo: bool = MISSING


@dataclass
class PruneConfig:
    """model.prune: model/pruning.py."""

    amount: float = MISSING
    method: str = MISSING  # l1_unstructured | ln_structured


@dataclass
class ModelConfig:
    """conf/model/*.yaml: architecture, weights source, freezing, optimization (model/, tasks/train.py)."""

    optimizer: Any = MISSING  # a `_target_` node from conf/model/optimizer/
    scheduler: Any = None  # a `_target_` node from conf/model/scheduler/ (none: no node)
    arch: str = MISSING
    init_from: Optional[str] = MISSING
    allow_pickle: bool = MISSING
    check_hash: bool = MISSING
    freeze: Any = MISSING  # true, false or a list of stage names: model/surgery.py parse_freeze
    train_bn: bool = MISSING
    bn_stats: str = MISSING  # auto | frozen | adapt | train: model/bn_adapt.py
    bn_adapt_images: Optional[int] = MISSING
    lr: float = MISSING
    label_smoothing: float = MISSING
    class_weights: Any = MISSING  # null, balanced or a list of weights: data/balance.py loss_weights
    weight_decay: float = MISSING
    stage_lr_mult: Any = MISSING  # a float, {stage: mult} or null: model/surgery.py
    feature_cache: Any = MISSING  # auto, true or false: model/feature_cache.py
    feature_cache_dtype: str = MISSING
    feature_cache_memory_mb: float = MISSING
    feature_cache_precision: str = MISSING  # auto | bf16 | fp32: model/extraction.py
    compile: bool = MISSING
    channels_last: Any = MISSING  # auto, true or false: model/module.py
    prune: PruneConfig = field(default_factory=PruneConfig)


def register_schemas() -> None:
    """Put the schemas where conf/data and conf/model name them in their defaults (`/data_schema@_here_`).

    Stored outside any group, so `--help` does not offer them as options.
    """
    store = ConfigStore.instance()
    store.store(name="data_schema", node=DataConfig)
    store.store(name="model_schema", node=ModelConfig)

"""A saved model made ready for use: the network its artifact describes, and the data split it was trained on.

Eval, export, predict and `retrain report` start here, so they read an artifact, and say what is wrong with it,
the same way. Lightning-free: predicting with a checkpoint does not pay for importing it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from retrain.artifacts.metadata import ArtifactMetadata
from retrain.artifacts.sources import load_source
from retrain.data.folds import as_recorded
from retrain.data.splits import DataSplits, split_as_recorded
from retrain.errors import ConfigError, DataError
from retrain.model.resnet import build_resnet
from retrain.model.surgery import load_weights

log = logging.getLogger("retrain")


def load_trained(source: str, *, model_dir: Path, allow_pickle: bool = False) -> tuple[nn.Module, ArtifactMetadata]:
    """Rebuild the network an artifact describes (arch, classes) with its weights, in eval mode, and its metadata."""
    artifact = load_source(source, model_dir=model_dir, allow_pickle=allow_pickle)
    meta = ArtifactMetadata.from_dict(artifact.metadata, source=source)
    net = build_resnet(meta.arch, meta.num_classes)
    load_weights(net, artifact.state_dict, source=source, replace_head=False)
    return net.eval(), meta


def trained_splits(
    meta: ArtifactMetadata,
    root: str | Path | None,
    *,
    source: str,
    option: str = "data.root=DIR",
    moved: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> DataSplits:
    """The images to score a model on, with its classes: `root` (default: the folder it was trained on), split as
    recorded when it is that folder (or, with `moved`, that folder at a new place), else by the given fractions.

    `option` is how the user names the folder (`data.root=DIR`, `--data-root DIR`), for the error messages.
    """
    recorded = meta.dataset
    root = root or recorded.get("root")
    if not root:
        raise ConfigError(
            f"{source} records no dataset, and {option.split('=')[0].split()[0]} is not set. Expected the image "
            "folder the model was trained on (DIR/train/<class>/*, DIR/val/<class>/* or DIR/<class>/*). "
            f"Fix: pass {option} with the classes {meta.class_names}."
        )
    here = Path(str(root)).expanduser().resolve()
    same = moved or here == Path(str(recorded.get("root", "/nonexistent")))
    if same:  # a k-fold CV model: its val is its fold of the pool
        splits = split_as_recorded(here, recorded, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        splits = as_recorded(splits, recorded)
    else:
        splits = _copy_of_the_trained_folder(here, recorded) or split_as_recorded(
            here, None, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
    _warn_if_drawn_from_other_images(splits, recorded, source)
    if splits.class_names != meta.class_names:
        raise DataError(
            f"The classes in {here} ({splits.class_names}) differ from the model's ({meta.class_names}). "
            f"Expected the class folders the model was trained on. Fix: pass {option} with those classes, or "
            f"train on this folder from the model (python train.py model.init_from={source} data.root={root})."
        )
    return splits


def _copy_of_the_trained_folder(here: Path, recorded: dict[str, Any]) -> DataSplits | None:
    """The recorded split at `here` when `here` holds the very files the model was split from (a copied or moved
    flat folder), else None: split with eval's own seed, a copy would put training images in the test split."""
    if recorded.get("layout") != "folder" or not recorded.get("fingerprint"):
        return None
    drawn = as_recorded(split_as_recorded(here, {k: v for k, v in recorded.items() if k != "split_file"}), recorded)
    return drawn if drawn.fingerprint() == recorded["fingerprint"] else None


def _warn_if_drawn_from_other_images(splits: DataSplits, recorded: dict[str, Any], source: str) -> None:
    """Say so when a flat folder's held-out images are drawn from files other than those the model was split from:
    a training image among them (a folder that grew, a copy with more images) would score too high, silently."""
    if splits.layout != "folder" or not recorded.get("fingerprint") or splits.fingerprint() == recorded["fingerprint"]:
        return
    log.warning(
        "%s holds other images than the folder %s was trained on (%s), so its val and test images are drawn anew "
        "(data.split_seed=%d): any image the model trained on that is also here may be among them and score too "
        "high. Fix: to score only held-out images, put them in DIR/test/<class>/ (and the training images in "
        "DIR/train/<class>/), or keep the training run's folder, whose split.json eval then reuses.",
        splits.root,
        source,
        recorded.get("root", "?"),
        splits.split_seed,
    )

"""A saved model made ready for use: the network its artifact describes, and the data split it was trained on.

Eval, export, predict and `retrain report` start here, so they read an artifact, and say what is wrong with it,
the same way. Lightning-free: predicting with a checkpoint does not pay for importing it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from retrain.artifacts.metadata import ArtifactMetadata
from retrain.artifacts.sources import load_source
from retrain.data.folds import as_recorded
from retrain.data.splits import DataSplits, split_as_recorded
from retrain.errors import ConfigError, DataError
from retrain.model.resnet import build_resnet
from retrain.model.surgery import load_weights


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
    splits = split_as_recorded(
        here, recorded if same else None, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    if same:  # a k-fold CV model: its val is its fold of the pool
        splits = as_recorded(splits, recorded)
    if splits.class_names != meta.class_names:
        raise DataError(
            f"The classes in {here} ({splits.class_names}) differ from the model's ({meta.class_names}). "
            f"Expected the class folders the model was trained on. Fix: pass {option} with those classes, or "
            f"train on this folder from the model (python train.py model.init_from={source} data.root={root})."
        )
    return splits

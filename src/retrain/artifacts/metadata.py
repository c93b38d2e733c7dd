"""What every saved file carries: who made it, from what, with which software, typed as `ArtifactMetadata`.

On disk it stays the JSON object of schema 1 (metadata.json, the checkpoint's `retrain` entry, the safetensors
header); `ArtifactMetadata.from_dict` reads any of them, checking the required keys once, and `to_dict` writes
the same JSON back. Kept free of torch and lightning imports so the registry CLI starts fast.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retrain.errors import ArtifactError

SCHEMA = 1
# Keys written only when they hold something, as the code that adds them always did.
_OPTIONAL = {"prune", "quantization", "history", "checkpoint_sha256", "results"}
_FIX = (
    "Expected a file written by retrain (.ckpt, .safetensors or a registry version). Fix: point to the "
    "checkpoint or registry version the model came from, or train from this one first "
    "(python train.py model.init_from={source} data.root=DIR)."
)


def _plain(obj: Any) -> Any:
    """JSON-plain (tuples become lists), so it also loads under ``torch.load(weights_only=True)``."""
    return json.loads(json.dumps(obj))


def _known_and_extra(cls: type, data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
    known = {key: value for key, value in data.items() if key in names}
    return known, {key: value for key, value in data.items() if key not in names}


@dataclass(frozen=True)
class Preprocessing:
    """The eval pipeline a model expects: Resize(resize) -> CenterCrop(crop) -> Normalize(mean, std)."""

    image_size: int
    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not model, written back as read

    REQUIRED = ("resize", "crop", "mean", "std")

    @classmethod
    def from_dict(cls, data: Any, *, source: str | Path = "this artifact") -> Preprocessing:
        """Read the `preprocessing` object of any published metadata; says which keys are missing."""
        missing = list(cls.REQUIRED) if not isinstance(data, Mapping) else [k for k in cls.REQUIRED if k not in data]
        if missing:
            raise ArtifactError(
                f"{source} records incomplete preprocessing ({', '.join(missing)} missing), so its input "
                f"pipeline is unknown. {_FIX.format(source=source)}"
            )
        known, extra = _known_and_extra(cls, data)
        problem: str | None
        try:
            pre = cls(
                image_size=int(known.get("image_size", known["crop"])),
                resize=int(known["resize"]),
                crop=int(known["crop"]),
                mean=tuple(float(x) for x in known["mean"]),
                std=tuple(float(x) for x in known["std"]),
                interpolation=str(known.get("interpolation", "bilinear")),
                extra=extra,
            )
        except (TypeError, ValueError) as e:
            problem = str(e)
        else:
            problem = pre._problem()
            if problem is None:
                return pre
        raise ArtifactError(
            f"{source} has damaged preprocessing metadata ({problem}). Expected whole numbers for image_size, "
            f"resize and crop, crop >= 1 and resize >= crop, and three numbers each for mean and std (std > 0). "
            f"{_FIX.format(source=source)}"
        )

    def _problem(self) -> str | None:
        """What makes these values unusable as an input pipeline, or None when they are usable."""
        for key in ("mean", "std"):
            if len(getattr(self, key)) != 3:
                return f"{key} is {list(getattr(self, key))}, not one number per RGB channel"
        if min(self.std) <= 0:
            return f"std is {list(self.std)}: dividing by a value <= 0"
        if self.crop < 1:
            return f"crop is {self.crop}"
        if self.resize < self.crop:
            return f"resize is {self.resize}, smaller than crop {self.crop}: the crop would be padded with zeros"
        return None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored in every artifact."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        plain: dict[str, Any] = _plain({**data, **self.extra})
        return plain


@dataclass(frozen=True, kw_only=True)
class ArtifactMetadata:
    """Everything a retrain artifact says about itself, as timm's PretrainedCfg does for its weights.

    Fields are in the order of the JSON file. Only arch, class_names and preprocessing are required: files
    described by other tools (torchvision weights) carry just those. Unmodelled keys travel in `extra`.
    """

    schema: int = SCHEMA
    name: str | None = None
    version: int | None = None
    created: str | None = None
    arch: str
    num_classes: int = field(init=False)  # len(class_names), stored for readers of the JSON
    class_names: list[str]
    preprocessing: Preprocessing
    augment: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    epoch: int | None = None
    global_step: int | None = None
    software: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None
    parent: dict[str, Any] | None = None
    freeze: list[str] = field(default_factory=list)
    train_bn: bool | None = None
    prune: dict[str, Any] | None = None  # model.prune's amount, method and the sparsity reached
    quantization: str | None = None  # "qat" for quantization-aware fine-tuned versions
    history: list[dict[str, float]] | None = None  # per-epoch val metrics, from the checkpoint
    checkpoint_sha256: str | None = None  # of the run's best checkpoint (extra `checkpoint_path`: where it is)
    results: dict[str, Any] | None = None  # monitor, its best value and epoch, test metrics
    extra: dict[str, Any] = field(default_factory=dict)

    REQUIRED = ("arch", "class_names", "preprocessing")

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_classes", len(self.class_names))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, source: str | Path = "this artifact") -> ArtifactMetadata:
        """Read the metadata of any published version (or a checkpoint's); an ArtifactError names what is missing."""
        data = data or {}
        missing = [key for key in cls.REQUIRED if key not in data]
        if missing:
            some = "incomplete" if len(missing) < len(cls.REQUIRED) else "no"
            raise ArtifactError(
                f"{source} carries {some} retrain metadata ({', '.join(missing)} missing), so its classes and "
                f"preprocessing are unknown. {_FIX.format(source=source)}"
            )
        known, extra = _known_and_extra(cls, data)
        names = known.pop("class_names")
        recorded_count = known.pop("num_classes", len(names))
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ArtifactError(
                f"{source} has damaged metadata: class_names is {names!r}, expected a list of class names. "
                f"{_FIX.format(source=source)}"
            )
        if recorded_count != len(names):
            raise ArtifactError(
                f"{source} has damaged metadata: num_classes is {recorded_count} but class_names lists "
                f"{len(names)}. {_FIX.format(source=source)}"
            )
        preprocessing = Preprocessing.from_dict(known.pop("preprocessing"), source=source)
        return cls(class_names=list(names), preprocessing=preprocessing, extra=extra, **known)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object that metadata.json, checkpoints and safetensors headers hold."""
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (f.name in _OPTIONAL and value is None):
                continue
            data[f.name] = value.to_dict() if isinstance(value, Preprocessing) else value
        plain: dict[str, Any] = _plain({**data, **self.extra})
        return plain


def software_versions() -> dict[str, str]:
    """Record the versions that produced an artifact, so a failing reload can be traced to an upgrade."""
    versions = {"python": platform.python_version()}
    # importlib.metadata reads the installed package records without importing lightning (~7 s).
    for dist in ("torch", "torchvision", "lightning", "retrain"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def git_commit(start: Path | None = None) -> str | None:
    """Return the HEAD commit of the code that trained a model, or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=start or Path.cwd(),
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = result.stdout.strip()
    return sha if result.returncode == 0 and sha else None


def new_metadata(
    *,
    name: str,
    version: int,
    arch: str,
    class_names: list[str],
    preprocessing: Preprocessing,
    augment: str,
    config: dict[str, Any],
    dataset: dict[str, Any],
    parent: dict[str, Any] | None,
    freeze: list[str],
    train_bn: bool,
) -> dict[str, Any]:
    """Build the metadata every artifact carries, so it can be reloaded without the config that made it.

    Returned as the JSON-plain dict a checkpoint holds (it loads under ``torch.load(weights_only=True)``);
    ``ArtifactMetadata.from_dict`` reads it back.
    """
    return ArtifactMetadata(
        name=name,
        version=version,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        arch=arch,
        class_names=list(class_names),
        preprocessing=preprocessing,
        augment=augment,
        config=config,
        dataset=dataset,
        software=software_versions(),
        git_commit=git_commit(),
        parent=parent,
        freeze=list(freeze),
        train_bn=train_bn,
    ).to_dict()

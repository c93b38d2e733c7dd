"""What every exported file carries so it can be used without retrain: class names and preprocessing.

The same facts are written three ways: inside the file where its format allows (ONNX metadata_props,
TorchScript and torch.export extra files, AOTInductor package metadata, all string to string), and once as
`preprocessing.json` beside the files, which any language can read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrain.artifacts.metadata import ArtifactMetadata, Preprocessing
from retrain.errors import ArtifactError
from retrain.utils.io import write_json

SIDECAR = "preprocessing.json"
EXTRA_FILE = "retrain.json"  # the name inside TorchScript and torch.export archives
INFO_KEYS = ("class_names", "preprocessing", "input", "input_layout", "output", "arch", "name", "version", "source")
# The int8 package runs compiled code that assumes this exact memory layout and does not check it.
INPUT_LAYOUT = (
    "float32 (N, 3, crop, crop), C-contiguous; RGB scaled to [0, 1], then (x - mean) / std; "
    "resize the shorter side to `resize` (bilinear), then center-crop `crop`"
)
_REQUIRED = ("class_names", "preprocessing")


@dataclass(frozen=True)
class DeployInfo:
    """The facts an exported model needs at inference time: its classes and input pipeline, and where it came from."""

    class_names: list[str]
    preprocessing: Preprocessing
    arch: str | None = None
    name: str | None = None
    version: int | None = None
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of preprocessing.json, with the fixed facts of every export (input, layout, output)."""
        return {
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing.to_dict(),
            "input": "images",
            "input_layout": INPUT_LAYOUT,
            "output": "logits",
            "arch": self.arch,
            "name": self.name,
            "version": self.version,
            "source": self.source,
        }


def deploy_info(meta: ArtifactMetadata, source: str) -> DeployInfo:
    """The facts an exported model needs at inference time, taken from its artifact's metadata."""
    return DeployInfo(meta.class_names, meta.preprocessing, meta.arch, meta.name, meta.version, source)


def to_props(info: DeployInfo) -> dict[str, str]:
    """Flatten to the string-to-string form of ONNX metadata_props and AOTInductor package metadata (JSON values)."""
    return {key: json.dumps(value) for key, value in info.to_dict().items()}


def from_props(props: dict[str, str], path: Path) -> DeployInfo:
    """Read back what `to_props` wrote; a file exported elsewhere is an ArtifactError that says what is missing."""
    missing = [key for key in _REQUIRED if key not in props]
    if missing:
        raise ArtifactError(
            f"{path} carries no {' or '.join(missing)} in its metadata, so its classes and preprocessing are "
            "unknown. Expected a model exported by `python export.py`. Fix: export it again with retrain, or "
            "use the checkpoint it was made from."
        )
    try:
        values = {key: json.loads(props[key]) for key in INFO_KEYS if key in props}
    except json.JSONDecodeError as e:
        raise ArtifactError(
            f"{path} has damaged retrain metadata ({e.msg}). Expected the JSON values `python export.py` writes. "
            "Fix: export it again from its checkpoint."
        ) from None
    return DeployInfo(
        class_names=_class_names(values["class_names"], path),
        preprocessing=Preprocessing.from_dict(values["preprocessing"], source=path),
        arch=values.get("arch"),
        name=values.get("name"),
        version=values.get("version"),
        source=values.get("source"),
    )


def _class_names(names: Any, path: Path) -> list[str]:
    """The recorded class names, refused unless they are distinct strings: each labels one of the model's outputs."""
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        problem = f"is {names!r}, expected a non-empty list of names"
    else:
        repeated = sorted({name for name in names if names.count(name) > 1})
        if not repeated:
            return names
        problem = f"names {repeated} more than once, so their outputs cannot be told apart"
    raise ArtifactError(
        f"{path} has damaged retrain metadata: its class_names {problem}. Expected one distinct name per output "
        "of the model, as `python export.py` writes them. Fix: export it again from its checkpoint."
    )


def write_sidecar(folder: Path, info: DeployInfo) -> Path:
    """Write preprocessing.json beside the exported files."""
    path = Path(folder) / SIDECAR
    write_json(path, info.to_dict())
    return path

"""One loader for every place weights can come from: a file, a registry version, or torchvision's weights."""

from __future__ import annotations

import logging
import os
import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any

import torch
import torchvision

from retrain.artifacts.formats import WEIGHT_SUFFIXES, Artifact, read_artifact
from retrain.artifacts.integrity import check_loaded
from retrain.artifacts.metadata import SCHEMA
from retrain.artifacts.registry import METADATA_FILE, NAME_RE, VERSION_DIR_RE, known_names, resolve
from retrain.errors import ArtifactError
from retrain.utils.io import atomic_write, read_json, sha256_file

log = logging.getLogger(__name__)

# In order of preference: safetensors never unpickles and carries no optimizer state.
VERSION_FILES = ("model.safetensors", "model.ckpt", "weights.pth")
_TORCHVISION_RE = re.compile(r"(?:(?P<enum>[A-Za-z0-9_]+_Weights)\.)?(?P<member>[A-Z][A-Z0-9_]*)")
_HUB_HASH_RE = re.compile(r"-([a-f0-9]{8,})\.")  # the hash prefix torch.hub puts in file names
_DOWNLOAD_TIMEOUT_S = 60
ACCEPTED_FORMS = (
    "a file (.ckpt, .pth, .pt, .safetensors, or a full-model pickle with allow_pickle), "
    "a registry reference (name@v3, name@3, name@latest, name, or a version folder like models/name/v003), "
    "or torchvision weights (IMAGENET1K_V1, DEFAULT or ResNet18_Weights.IMAGENET1K_V1)"
)


def load_source(
    source: str,
    *,
    model_dir: Path,
    allow_pickle: bool = False,
    arch: str = "resnet18",
    check_hash: bool = True,
) -> Artifact:
    """Turn any accepted weights source into a CPU state_dict with torchvision keys plus its metadata."""
    text = str(source).strip()
    path = Path(text).expanduser()
    if path.exists():
        # Absolute and through symlinks: models/x/latest must be recorded as the version it is today.
        path = path.resolve()
    if path.is_dir():
        return _load_version_dir(path, allow_pickle)
    if path.is_file():
        return _read_with_version_metadata(path, allow_pickle)
    if "@" in text:
        return _load_version_dir(resolve(model_dir, text), allow_pickle)
    if NAME_RE.fullmatch(text) and text in known_names(model_dir):  # the user's names win over torchvision's
        return _load_version_dir(resolve(model_dir, text), allow_pickle)
    if m := _TORCHVISION_RE.fullmatch(text):
        return load_torchvision(arch, m.group("member"), enum_name=m.group("enum"), check_hash=check_hash)
    if text.endswith(WEIGHT_SUFFIXES) or os.sep in text or "/" in text:
        read_artifact(path)  # raises the missing-file error, which lists similar files
    known = ", ".join(known_names(model_dir)) or "none yet"
    raise ArtifactError(
        f"Weights source {text!r} is not an existing file or folder, a registry model in {model_dir} "
        f"(known names: {known}), or a torchvision weights name. Expected {ACCEPTED_FORMS}. "
        "Fix: correct the path or name, or set model.init_from=null to start from random weights."
    )


def parent_record(source: str, artifact: Artifact) -> dict[str, Any]:
    """Describe where a model's starting weights came from, for the ``parent`` field of its metadata."""
    metadata = artifact.metadata or {}
    return {
        "source": source,
        "path": str(artifact.path) if artifact.path is not None else None,
        "sha256": artifact.sha256,
        "name": metadata.get("name"),
        "version": metadata.get("version"),
    }


def _identity(folder: Path) -> tuple[str, int] | None:
    m = VERSION_DIR_RE.fullmatch(folder.name)
    return (folder.parent.name, int(m.group(1))) if m else None


def _load_version_dir(folder: Path, allow_pickle: bool) -> Artifact:
    for filename in VERSION_FILES:
        if (folder / filename).is_file():
            return _read_with_version_metadata(folder / filename, allow_pickle)
    raise ArtifactError(
        f"{folder} is a folder without model weights. Expected a registry version folder holding "
        f"{' or '.join(VERSION_FILES)}. Fix: point to a weights file, or to a version such as "
        "models/<name>/v003 or the reference <name>@latest."
    )


def _read_with_version_metadata(path: Path, allow_pickle: bool) -> Artifact:
    """Read a weights file; in a registry version, attach its metadata.json (authoritative: it holds the final
    metrics) and its name/version.

    First the file and metadata.json are checked against what was published (integrity.py), so edited weights
    or swapped class names are refused instead of changing predictions silently; before the file is read, so the
    message names the published and the found SHA-256 (reading would refuse a changed .safetensors by itself).
    """
    folder = path.parent
    identity = _identity(folder)
    sidecar = folder / METADATA_FILE
    if identity is None or not sidecar.is_file() or path.suffix == ".json":  # metadata.json: "pass its folder"
        return read_artifact(path, allow_pickle=allow_pickle)
    metadata = read_json(sidecar)
    found = sha256_file(path)
    check_loaded(folder, path, found, metadata)
    artifact = read_artifact(path, allow_pickle=allow_pickle, sha256=found)
    artifact.metadata = {**metadata, "name": identity[0], "version": identity[1]}
    return artifact


def load_torchvision(arch: str, member: str, *, enum_name: str | None = None, check_hash: bool = True) -> Artifact:
    """Load torchvision's pretrained weights from the torch.hub cache (downloading once), with their facts."""
    try:
        weights_enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise ArtifactError(
            f"torchvision has no pretrained weights for arch {arch!r}. Expected a torchvision model name "
            "such as resnet18. Fix: set model.arch to a torchvision ResNet, or model.init_from=null."
        ) from None
    if enum_name is not None and enum_name != weights_enum.__name__:
        raise ArtifactError(
            f"Weights {enum_name}.{member} do not belong to arch {arch!r}, whose weights are "
            f"{weights_enum.__name__}. Fix: use {weights_enum.__name__}.{member} or just {member}, or "
            "change model.arch to match the weights."
        )
    try:
        weights = weights_enum[member]
    except KeyError:
        names = ", ".join(["DEFAULT", *(w.name for w in weights_enum)])
        raise ArtifactError(
            f"{member!r} is not a weights name of {weights_enum.__name__}. Expected one of: {names}. "
            "Fix: use one of those names."
        ) from None
    url = weights.url
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    file = folder / os.path.basename(urllib.parse.urlparse(url).path)
    if not file.is_file():
        try:
            _download(url, file)
        except (OSError, ValueError) as e:
            raise ArtifactError(
                f"torchvision weights {weights_enum.__name__}.{weights.name} are not in the cache and could "
                f"not be downloaded ({e}). Expected the file {file.name} in {folder}. Fix: on a machine with "
                f"internet access fetch {url} and copy it to {file} (the folder follows TORCH_HOME), or "
                "set model.init_from=null to start from random weights."
            ) from None
    if check_hash:
        _check_hub_hash(file, url)
    try:
        artifact = read_artifact(file)
    except ArtifactError as e:
        raise ArtifactError(
            f"The cached torchvision weights {file} are damaged: {e} Fix: delete {file} and run again to "
            f"download it, or fetch {url} on another machine and copy it there."
        ) from None
    artifact.kind = "torchvision"
    artifact.metadata = _torchvision_metadata(arch, weights_enum.__name__, weights)
    return artifact


def _download(url: str, dest: Path) -> None:
    """Fetch into the cache atomically, with a timeout so a firewalled machine fails instead of hanging."""
    log.info("Downloading %s to %s", url, dest)

    def write(f: IO[bytes]) -> None:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            shutil.copyfileobj(response, f, 1 << 20)

    atomic_write(dest, write)


def _check_hub_hash(file: Path, url: str) -> None:
    m = _HUB_HASH_RE.search(file.name)
    if m is None:
        return
    expected = m.group(1)
    actual = sha256_file(file)
    if not actual.startswith(expected):
        raise ArtifactError(
            f"The cached torchvision weights {file} fail their integrity check: the file's sha256 starts "
            f"with {actual[: len(expected)]}, but its name promises {expected}. The file is corrupt or "
            f"incomplete (e.g. an interrupted download). Fix: delete it and run again to download it, or "
            f"fetch {url} on another machine and copy it to {file}."
        )


def _torchvision_metadata(arch: str, enum_name: str, weights: Any) -> dict[str, Any]:
    """The facts torchvision's weights API states about these weights, in our metadata's vocabulary."""
    transforms = weights.transforms()
    crop = int(transforms.crop_size[0])
    categories = list(weights.meta["categories"])
    return {
        "schema": SCHEMA,
        "name": f"{enum_name}.{weights.name}",
        "version": None,
        "arch": arch,
        "num_classes": len(categories),
        "class_names": categories,
        "preprocessing": {
            "image_size": crop,
            "resize": int(transforms.resize_size[0]),
            "crop": crop,
            "mean": list(transforms.mean),
            "std": list(transforms.std),
            "interpolation": transforms.interpolation.value,
        },
        "url": weights.url,
    }

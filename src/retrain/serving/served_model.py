"""One loaded model version as the server uses it: bytes in, the pixels predict.py would see, top-k labels out.

Decoding and preprocessing are retrain's own (`open_rgb` with JPEG draft decoding, then the artifact's eval
transforms), the code predict.py and training use, so a photo gets the same pixels and the same answer here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from retrain.artifacts.metadata import Preprocessing
from retrain.artifacts.registry import version_dirname
from retrain.data.images import CORRUPT, check_image, open_rgb
from retrain.data.transforms import eval_transforms
from retrain.inference.predictions import top_k
from retrain.inference.runtimes import Runtime
from retrain.serving.backends import BackendChoice, choose_backend, resolve_device, version_folder
from retrain.serving.settings import ServeSettings
from retrain.serving.uploads import image_error

Answer = list[tuple[str, float]]


@dataclass
class ServedModel:
    """A model version ready to answer: its runtime, the label responses carry, and its preprocessing."""

    label: str  # "cats@v003" for a registry version, else the file it came from
    source: str
    folder: Path | None  # the registry version folder, which the watcher compares with `latest`
    runtime: Runtime
    backend: BackendChoice
    top_k: int
    transform: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.transform = eval_transforms(self.preprocessing)
        self.top_k = min(self.top_k, len(self.class_names))

    @property
    def class_names(self) -> list[str]:
        """The labels, in the order of the model's outputs."""
        return list(self.runtime.info.class_names)

    @property
    def preprocessing(self) -> Preprocessing:
        """Resize, crop, mean and std, as recorded in the artifact."""
        return self.runtime.info.preprocessing

    def preprocess(self, data: bytes) -> torch.Tensor:
        """The normalized (3, crop, crop) tensor of an uploaded image; a RequestError says what is wrong with it."""
        # A header and structure check first: it rejects a decompression bomb before any pixel is decoded.
        problem = check_image(data, full=False)
        if problem is None:
            try:
                # min_size as predict.py's default fast_decode: big JPEGs are decoded at a reduced scale.
                return self.transform(open_rgb(data, self.preprocessing.resize))
            except Exception as e:  # a decode failure the quick check missed; the full check names it
                problem = check_image(data, full=True) or (CORRUPT, f"{type(e).__name__}: {e}")
        raise image_error(*problem)

    def answer(self, images: torch.Tensor) -> list[Answer]:
        """Top-k (label, probability) pairs per image, by predict.py's own ranking and rounding."""
        return top_k(self.runtime.predict(images), self.class_names, self.top_k)

    def warm_up(self, batch_size: int) -> None:
        """Run a synthetic JPEG through decode, preprocessing and the model, alone and in a full batch."""
        size = self.preprocessing.resize
        buffer = io.BytesIO()
        Image.new("RGB", (size, size), (128, 100, 80)).save(buffer, "JPEG")
        image = self.preprocess(buffer.getvalue())
        for n in sorted({1, batch_size}):
            self.answer(image.expand(n, *image.shape).contiguous())

    def describe(self) -> dict[str, Any]:
        """What /info shows about this version."""
        info = self.runtime.info
        return {
            "model": self.label,
            "name": info.name,
            "version": info.version,
            "source": self.source,
            "class_names": self.class_names,
            "preprocessing": self.preprocessing.to_dict(),
            "backend": {
                "kind": self.backend.kind,
                "device": self.backend.device,
                "reason": self.backend.reason,
                "ms_per_image": self.backend.ms_per_image,
            },
            "top_k": self.top_k,
        }


def _from_the_registry(source: str, folder: Path | None, exported_from: str | None) -> bool:
    """Whether the weights served are a published version's: a reference or a version folder, a file inside one,
    or an export made from a reference. A checkpoint also carries its run's reserved name and version, but may hold
    other weights (last.ckpt is not the best epoch that was published): it is named by its path instead."""
    path = Path(source).expanduser().resolve()
    in_a_version = any((parent / "metadata.json").is_file() for parent in (path.parent, path.parent.parent))
    return folder is not None or in_a_version or "@" in (exported_from or "")


@dataclass
class ModelSlot:
    """The version new requests get; a hot swap replaces it with one assignment."""

    model: ServedModel


def load_served_model(
    source: str, settings: ServeSettings, *, model_dir: Path, allow_pickle: bool, keep: str | None = None
) -> ServedModel:
    """Load a SOURCE with the backend the settings ask for (or auto's pick, or `keep`: see choose_backend); warm up."""
    folder = version_folder(source, model_dir)
    runtime, choice = choose_backend(
        source,
        folder,
        backend=settings.backend,
        device=resolve_device(settings.device),
        batch_size=settings.max_batch_size,
        model_dir=model_dir,
        allow_pickle=allow_pickle,
        keep=keep,
    )
    name, version = runtime.info.name, runtime.info.version
    published = name and version is not None and _from_the_registry(source, folder, runtime.info.source)
    label = f"{name}@{version_dirname(int(version or 0))}" if published else source
    model = ServedModel(label, source, folder, runtime, choice, settings.top_k)
    model.warm_up(settings.max_batch_size)
    return model

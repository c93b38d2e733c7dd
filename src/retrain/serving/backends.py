"""Which runtime answers requests: every backend a source offers, and `auto`'s measured choice among them.

A registry version offers its weights (the eager model) and whatever `python export.py` wrote into its exports/
folder; an exported file offers itself. `auto` times each full-precision candidate on this machine at the
server's batch size and keeps the fastest. int8 is left out of `auto` because it changes the answers (it is a
quantized model); `serve.backend=int8` asks for it. The exported runtimes of retrain run on the CPU, so on a GPU
machine the eager model on CUDA is measured against them.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from retrain.artifacts.metadata import ArtifactMetadata
from retrain.artifacts.registry import NAME_RE, known_names, resolve
from retrain.errors import ArtifactError, ConfigError
from retrain.inference.deploy_info import deploy_info
from retrain.inference.runtimes import FILE_NAMES, Runtime, detect_kind, eager_runtime, load_runtime
from retrain.model.loading import load_trained
from retrain.utils.io import read_json

log = logging.getLogger("retrain")

AUTO_KINDS = ("eager", "onnx", "torchscript", "export")  # full precision: the answers of the trained model
_TIMED_CALLS = 3
_AGREEMENT_ATOL = 1e-3  # on softmax probabilities, as export.py's verification


@dataclass(frozen=True)
class BackendChoice:
    """The backend that answers, the device it runs on, why it was picked, and what was measured."""

    kind: str
    device: str
    reason: str
    ms_per_image: dict[str, float] = field(default_factory=dict)


def resolve_device(requested: str) -> str:
    """cuda when asked for (and present) or when `auto` finds a GPU, else cpu."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "serve.device=cuda, but torch sees no CUDA GPU on this machine. Expected a machine with a GPU and a "
            "CUDA build of torch. Fix: serve.device=auto (the CPU here) or run it on a GPU machine."
        )
    return "cuda" if requested in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def version_folder(source: str, model_dir: Path) -> Path | None:
    """The registry version folder a SOURCE names (a version folder or a reference like name@latest), else None."""
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve() if path.is_dir() else None
    if "@" in source or (NAME_RE.fullmatch(source) and source in known_names(model_dir)):
        return resolve(model_dir, source)
    return None


def offered(source: str, folder: Path | None) -> dict[str, Path]:
    """The backends a source offers, each with the file it loads: an export is itself; a version adds its exports/."""
    path = Path(source).expanduser()
    kind = detect_kind(path)
    if kind is not None:
        return {kind: path}
    if folder is None:
        return {"eager": path}
    found = {"eager": folder}
    for kind, name in FILE_NAMES.items():
        if (folder / "exports" / name).is_file():
            found[kind] = folder / "exports" / name
    return found


def load_backend(kind: str, path: Path, *, device: str, model_dir: Path, allow_pickle: bool) -> Runtime:
    """Load one backend: the eager model (on `device`) from any SOURCE, or an exported file in its runtime."""
    if kind != "eager":
        return _as_its_version(load_runtime(path), path)
    source = str(path)
    net, meta = load_trained(source, model_dir=model_dir, allow_pickle=allow_pickle)
    runtime = eager_runtime(net.to(device), deploy_info(meta, source))
    if device == "cpu":
        return runtime
    on_cpu = runtime.predict

    def predict(images: torch.Tensor) -> torch.Tensor:
        return on_cpu(images.to(device, non_blocking=True)).cpu()

    return Runtime("eager", predict, runtime.info)


def _as_its_version(runtime: Runtime, path: Path) -> Runtime:
    """An export in a version's exports/ folder, refused unless it carries that version's classes and preprocessing.

    The registry's digests cover the version's weights and metadata, not exports/: a swapped or edited export would
    otherwise answer, under the version's name, with other labels or another input pipeline.
    """
    version = path.parent.parent
    if path.parent.name != "exports" or not (version / "metadata.json").is_file():
        return runtime
    meta = ArtifactMetadata.from_dict(read_json(version / "metadata.json"), source=version)
    differs = [
        what
        for what, ours, theirs in (
            ("class_names", runtime.info.class_names, meta.class_names),
            ("preprocessing", runtime.info.preprocessing.to_dict(), meta.preprocessing.to_dict()),
        )
        if ours != theirs
    ]
    if differs:
        raise ArtifactError(
            f"{path} does not carry the {' and '.join(differs)} of the version it sits in ({version}): it was "
            f"changed or copied from another model. Fix: export the version again (python export.py "
            f"ckpt_path={version}), or serve its weights with serve.backend=eager."
        )
    return runtime


def choose_backend(
    source: str,
    folder: Path | None,
    *,
    backend: str,
    device: str,
    batch_size: int,
    model_dir: Path,
    allow_pickle: bool,
    keep: str | None = None,
) -> tuple[Runtime, BackendChoice]:
    """Load the requested backend, or with `auto` every full-precision one offered, timed; keep the fastest.

    `folder` is the registry version `source` resolved to (see version_folder): it is loaded from there, so a
    `latest` that moves meanwhile cannot slip another version in. `keep` (a hot swap's current backend) is taken
    without timing when offered: timings taken under load would measure the load, and loading every candidate
    would hold several models in memory at once.
    """
    available = offered(str(folder) if folder else source, folder)

    def loader(kind: str) -> Callable[[], Runtime]:
        return lambda: load_backend(
            kind, available[kind], device=_device_of(kind, device), model_dir=model_dir, allow_pickle=allow_pickle
        )

    load = {kind: loader(kind) for kind in available}
    if backend != "auto":
        if backend not in available:
            raise ConfigError(
                f"serve.backend={backend}, but {source} offers only {sorted(available)}. Expected the file that "
                f"backend runs ({FILE_NAMES.get(backend, 'the weights')}) in the version's exports/ folder. Fix: "
                f"python export.py ckpt_path={source} formats=[{backend}], or serve.backend=auto."
            )
        return load[backend](), BackendChoice(backend, _device_of(backend, device), f"serve.backend={backend}")
    candidates = [kind for kind in AUTO_KINDS if kind in available]
    if keep in candidates:
        reason = f"auto: {keep}, kept from the version before (a hot swap does not time backends under load)"
        return load[keep](), BackendChoice(keep, _device_of(keep, device), reason)
    if not candidates:  # an int8 file alone
        kind = next(iter(available))
        return load[kind](), BackendChoice(kind, "cpu", f"auto: {kind} is the only backend {source} offers")
    if len(candidates) == 1:
        kind = candidates[0]
        hint = (
            f"; `python export.py ckpt_path={source}` writes exports that auto would measure against it"
            if kind == "eager" and folder is not None
            else ""
        )
        return load[kind](), BackendChoice(
            kind, _device_of(kind, device), f"auto: {kind} is the only full-precision backend {source} offers{hint}"
        )
    return _fastest(candidates, load, device, batch_size, source)


def _fastest(
    candidates: list[str], load: dict[str, Callable[[], Runtime]], device: str, batch_size: int, source: str
) -> tuple[Runtime, BackendChoice]:
    runtimes: dict[str, Runtime] = {}
    skipped: list[str] = []
    for kind in candidates:
        try:
            runtimes[kind] = load[kind]()
        except ArtifactError as e:  # a damaged export must not stop the server when the weights are fine
            log.warning("serve.backend=auto leaves out %s: %s", kind, e)
            skipped.append(f"{kind} could not be loaded")
    if not runtimes:
        raise ArtifactError(
            f"None of the backends {source} offers ({', '.join(candidates)}) could be loaded; the warnings above "
            "say why. Fix: export the model again, or point ckpt_path at its weights."
        )
    crop = next(iter(runtimes.values())).info.preprocessing.crop
    images = torch.randn(batch_size, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    timings: dict[str, float] = {}
    reference: torch.Tensor | None = None
    for kind, runtime in runtimes.items():
        probs = runtime.predict(images).float().softmax(dim=1)  # also the warm-up call
        if reference is None:
            reference = probs  # eager comes first when offered
        elif not torch.allclose(probs, reference, atol=_AGREEMENT_ATOL):
            skipped.append(f"{kind} disagrees with {candidates[0]}")
            continue
        timings[kind] = _ms_per_image(runtime, images)
    kind = min(timings, key=timings.__getitem__)
    measured = ", ".join(f"{k} {ms:.2f}" for k, ms in sorted(timings.items(), key=lambda item: item[1]))
    left_out = f"; left out: {', '.join(skipped)}" if skipped else ""
    reason = (
        f"auto: fastest of {len(timings)} measured on this machine at batch {batch_size} "
        f"(ms/image: {measured}){left_out}; int8 is never auto-picked (it changes the answers)"
    )
    return runtimes[kind], BackendChoice(kind, _device_of(kind, device), reason, timings)


def _ms_per_image(runtime: Runtime, images: torch.Tensor) -> float:
    times = []
    for _ in range(_TIMED_CALLS):
        start = time.perf_counter()
        runtime.predict(images)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / len(images)


def _device_of(kind: str, device: str) -> str:
    return device if kind == "eager" else "cpu"

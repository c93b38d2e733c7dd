"""Reading and writing every weights format safely: Lightning .ckpt, .pth/.pt, .safetensors, full pickles.

Reading never runs code from a file unless the user opts in (``allow_pickle``), always lands on the CPU,
detects the format by content rather than by suffix, and turns every failure into an ArtifactError.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import json
import os
import pickle
import pickletools
import shutil
import struct
import time
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from retrain.errors import ArtifactError, DiskFullError, UnsafePickleError
from retrain.utils.io import atomic_write, sha256_file

HOLD_ENV = "RETRAIN_TEST_HOLD_WRITE"
WEIGHT_SUFFIXES = (".ckpt", ".pth", ".pt", ".safetensors", ".bin")
# Attribute names under which training code commonly wraps a torchvision network:
# LightningModules (model/net/backbone), torch.compile (_orig_mod) and DataParallel/DDP (module).
WRAPPER_PREFIXES = ("model.", "net.", "backbone.", "_orig_mod.", "module.")
# Wrappers that can only mean "the same network, wrapped", so a plain state_dict loses them silently.
SILENT_PREFIXES = ("_orig_mod.", "module.")
_SAFETENSORS_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
# Header key of the digest retrain writes into its .safetensors files (files from other tools have none: not checked).
SAFETENSORS_DIGEST_KEY = "retrain_sha256"
_ALLOW_PICKLE_FIX = (
    "Fix: if you trust where the file came from, set model.allow_pickle=true (train.py) or allow_pickle=true "
    "(eval.py, predict.py, export.py); better, load it once in a "
    "trusted Python session and re-save only the weights with torch.save(model.state_dict(), 'weights.pth')."
)


@dataclass
class Artifact:
    """Weights with plain torchvision keys plus whatever the file says about itself."""

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] | None
    path: Path | None
    kind: str  # "lightning" | "state_dict" | "safetensors" | "full_model" | "torchvision"
    sha256: str | None
    checkpoint: dict[str, Any] | None = None  # the raw Lightning checkpoint when kind == "lightning"


def _hold_if_requested() -> None:
    hold = os.environ.get(HOLD_ENV)
    if not hold:
        return
    # open() rather than touch(): if a test made `.reached` a FIFO, this blocks until the test reads it.
    with open(hold + ".reached", "w"):
        pass
    while not os.path.exists(hold):
        time.sleep(0.01)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save that never leaves a half-written file behind, even if the process is killed mid-write.

    The object goes to a temp file in the same folder, which is flushed, fsynced and moved over ``path``
    with ``os.replace``. For tests: when the environment variable ``RETRAIN_TEST_HOLD_WRITE=<path>`` is
    set, the writer opens ``<path>.reached`` for writing (creating it; if it is a FIFO this blocks until a
    reader opens it) after the temp file is complete and before ``os.replace``, then waits until
    ``<path>`` exists. A test can thus SIGKILL the process deterministically in the middle of a write.
    """
    atomic_write(Path(path), lambda f: torch.save(obj, f), before_replace=_hold_if_requested)


def tensor_bytes(obj: Any) -> int:
    """The bytes of all tensors in a (nested) checkpoint or state_dict: about what saving it writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def _is_disk_full(error: BaseException | None) -> bool:
    # torch.save into a Python file reports a failed write as RuntimeError "[enforce fail at inline_container.cc]"
    # with the OSError as its context; written from C++ it says "file write failed" and carries no errno.
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, RuntimeError) and "file write failed" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _free_bytes(folder: Path) -> int | None:
    for place in (folder, *folder.parents):
        if place.exists():
            with contextlib.suppress(OSError):
                return shutil.disk_usage(place).free
            return None
    return None


@contextlib.contextmanager
def reporting_disk_full(folder: Path, needed: int, what: str, intact: str, then: str) -> Iterator[None]:
    """Turn a disk that fills up during a write into one paragraph: folder, bytes needed and free, what is intact.

    Without it the user gets a raw ``OSError`` or torch's ``RuntimeError ... inline_container.cc``.
    """
    try:
        yield
    except (OSError, RuntimeError) as error:
        if not _is_disk_full(error):
            raise
        free = _free_bytes(Path(folder))
        room = f"at least {_size(needed - free)} " if free is not None and needed > free else ""
        raise DiskFullError(
            f"The disk filled up while writing {what} in {folder}: it needs about {_size(needed)}, and "
            f"{'an unknown amount' if free is None else _size(free)} is free there. {intact} Fix: free {room}space "
            f"on that disk (or point paths.log_dir or paths.model_dir at a disk with room), then {then}."
        ) from None


def save_weights_pth(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Save a plain state_dict that loads with ``torchvision.models.resnet18(...).load_state_dict``."""
    # A copy per tensor, so views of a larger storage do not drag the whole storage into the file.
    plain = {key: value.detach().to("cpu", copy=True) for key, value in state_dict.items()}
    atomic_torch_save(plain, path)


def save_safetensors(state_dict: dict[str, torch.Tensor], metadata: dict[str, Any] | None, path: Path) -> None:
    """Save weights in the pickle-free format, with our metadata as JSON in the header."""
    tensors = {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state_dict.items()}
    # safetensors metadata is str -> str; "format": "pt" tells other tools these are PyTorch tensors.
    header = {"format": "pt"}
    if metadata is not None:
        header["retrain"] = json.dumps(metadata)
    header[SAFETENSORS_DIGEST_KEY] = _safetensors_digest(tensors, header.get("retrain"))
    data = safetensors_bytes(tensors, metadata=header)
    atomic_write(Path(path), lambda f: f.write(data))


def _safetensors_digest(tensors: dict[str, torch.Tensor], metadata: str | None) -> str:
    """SHA-256 of the tensors (by name: dtype, shape, raw bytes) and our metadata, which safetensors does not check."""
    digest = hashlib.sha256((metadata or "").encode())
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_full_model(model: torch.nn.Module, path: Path) -> None:
    """Pickle a whole module for users who ask for it; reading it back requires allow_pickle."""
    atomic_torch_save(model, path)


def strip_wrapper_prefixes(
    state_dict: dict[str, torch.Tensor], prefixes: Iterable[str] = SILENT_PREFIXES
) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes shared by all keys (repeatedly: ``model._orig_mod.``) to get torchvision keys."""
    prefixes = tuple(prefixes)
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in prefixes:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
                changed = True
    return state_dict


def _network_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the keys under the most common wrapper prefix of a LightningModule, torchvision keys after."""
    counts = {p: sum(key.startswith(p) for key in state_dict) for p in WRAPPER_PREFIXES}
    best = max(counts, key=lambda p: counts[p])
    if 0 < counts[best] < len(state_dict):
        # The other keys belong to the LightningModule itself (e.g. a loss-weight buffer), not the network.
        state_dict = {key: value for key, value in state_dict.items() if key.startswith(best)}
    return strip_wrapper_prefixes(state_dict, WRAPPER_PREFIXES)


def read_artifact(path: Path, *, allow_pickle: bool = False, sha256: str | None = None) -> Artifact:
    """Read any supported weights file into torchvision keys on the CPU, refusing to run code from it.

    `sha256`: the file's hash when the caller has just computed it (the registry's check), so it is not read twice.
    """
    path = Path(path)
    if not path.exists():
        raise _missing_file_error(path)
    if path.is_dir():
        raise ArtifactError(
            f"{path} is a folder, expected a weights file. Fix: pass a file inside it (for example "
            "model.safetensors or weights.pth), or a registry reference such as name@latest."
        )
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise ArtifactError(f"{path} could not be opened ({e}). Fix: check the file's permissions.") from None
    if size == 0:
        raise ArtifactError(
            f"{path} is empty (0 bytes), expected a checkpoint or weights file. This usually means a save or "
            "copy was interrupted. Fix: copy the file again, or use another checkpoint or registry version."
        )
    if _looks_like_safetensors(head):
        artifact = _read_safetensors(path)
    elif head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save zip, or a (legacy) pickle
        artifact = _from_loaded(_torch_load(path, head, allow_pickle), path)
    elif head.lstrip()[:1] in (b"{", b"["):
        raise ArtifactError(
            f"{path} is a JSON text file, not weights. Expected a .ckpt, .pth, .pt or .safetensors file. "
            "Fix: if this is a registry metadata.json, pass its folder or the reference name@vN instead; "
            "otherwise point to the checkpoint itself."
        )
    else:
        raise ArtifactError(
            f"{path} is not in any weights format retrain reads: it starts with bytes {head[:8].hex(' ')}. "
            "Expected a PyTorch checkpoint (.ckpt/.pth/.pt written by torch.save or Lightning) or a "
            ".safetensors file; exports (ONNX, TorchScript) cannot be retrained. Fix: point to the "
            "checkpoint or weights file, or copy it again if it was damaged in transfer."
        )
    artifact.sha256 = sha256 or sha256_file(path)
    return artifact


def _missing_file_error(path: Path) -> ArtifactError:
    folder = path.parent
    where = f" (relative to the working directory {Path.cwd()})" if not path.is_absolute() else ""
    if not folder.is_dir():
        return ArtifactError(
            f"{path} does not exist{where}, and neither does its folder {folder}. Expected a .ckpt, .pth, "
            ".pt or .safetensors file. Fix: check the path, or use a registry reference such as name@latest."
        )
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    similar = difflib.get_close_matches(path.name, names, n=5, cutoff=0.5)
    similar = similar or [n for n in names if n.endswith(WEIGHT_SUFFIXES)][:8]
    found = f" Files in {folder} that may be meant: {', '.join(similar)}." if similar else ""
    return ArtifactError(
        f"{path} does not exist{where}.{found} Expected a .ckpt, .pth, .pt or .safetensors file. "
        "Fix: correct the path, or use a registry reference such as name@latest."
    )


def _looks_like_safetensors(head: bytes) -> bool:
    # The file opens with the header length (u64 little-endian), then a JSON header.
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length <= _SAFETENSORS_MAX_HEADER and head[8:9] == b"{"


def _read_safetensors(path: Path) -> Artifact:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            state_dict = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # SafetensorError and friends: report, never a raw traceback
        raise _corrupt_error(path, "safetensors", e) from None
    if not state_dict:
        raise ArtifactError(
            f"{path} is a safetensors file with no tensors in it. Expected model weights. "
            "Fix: point to the model.safetensors written by retrain, or another weights file."
        )
    recorded = header.get(SAFETENSORS_DIGEST_KEY)
    if recorded is not None and recorded != _safetensors_digest(state_dict, header.get("retrain")):
        raise ArtifactError(
            f"{path} was changed after it was written: its tensors or metadata no longer match the SHA-256 retrain "
            "recorded in its header (the file was edited, or damaged on disk or in transfer). Expected the file as it "
            "was saved; loading it would give weights nobody trained. Fix: copy it again from where it came from, or "
            "use the version's weights.pth or another registry version."
        )
    metadata = None
    if "retrain" in header:
        try:
            metadata = json.loads(header["retrain"])
        except json.JSONDecodeError as e:
            raise ArtifactError(
                f"{path} has damaged retrain metadata in its header ({e.msg}). Expected the JSON that "
                "retrain writes there. Fix: copy the file again, or use the version's weights.pth."
            ) from None
    return Artifact(strip_wrapper_prefixes(state_dict), metadata, path, "safetensors", None)


def _torch_load(path: Path, head: bytes, allow_pickle: bool) -> Any:
    is_zip = head.startswith(b"PK\x03\x04")
    if is_zip and _is_torchscript(path):
        raise ArtifactError(
            f"{path} is a TorchScript export, not a checkpoint. Expected weights that can be retrained "
            "(.ckpt, .pth, .pt or .safetensors). Fix: use the checkpoint the export was made from; "
            "run TorchScript files with torch.jit.load."
        )
    if is_zip and (entry := _changed_entry(path)) is not None:
        raise ArtifactError(
            f"{path} was changed after it was written: the bytes of its entry {entry} no longer match the CRC-32 "
            "checksum torch.save recorded with them (the file was edited, or damaged on disk or in transfer). "
            "Expected the file as it was saved; loading it would give weights or a state nobody trained. Fix: copy "
            "it again from where it came from, or use another checkpoint or registry version."
        )
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols before failing cleanly; our error says it better.
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            # A file object, not the path: torch.load would pick safetensors by the suffix alone.
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # zip, pickle and storage errors: report, never a raw traceback
        raise _load_error(path, is_zip, allow_pickle, e) from None


def _load_error(path: Path, is_zip: bool, allow_pickle: bool, error: Exception) -> ArtifactError:
    """Say why torch.load failed: code in the pickle, a non-torch pickle, missing classes, or damage."""
    if not allow_pickle and isinstance(error, pickle.UnpicklingError):
        unsafe = _unsafe_globals(path, is_zip)
        if unsafe:
            return UnsafePickleError(
                f"{path} contains pickled Python objects that can only be loaded by running code from the "
                f"file ({', '.join(unsafe[:6])}{', ...' if len(unsafe) > 6 else ''}). Loading it could "
                "execute anything its author wrote, so retrain refuses by default. Expected tensors only: "
                "a state_dict, a Lightning checkpoint or a .safetensors file. " + _ALLOW_PICKLE_FIX
            )
    if not is_zip and _is_plain_pickle(path):
        return ArtifactError(
            f"{path} is a plain Python pickle (pickle.dump), not a file written by torch.save, Lightning or "
            "safetensors, so retrain cannot read weights from it. Fix: save the weights with "
            "torch.save(model.state_dict(), path) and point to that file."
        )
    if allow_pickle and isinstance(error, (ImportError, AttributeError)):
        return ArtifactError(
            f"{path} is a pickle that needs Python code not available here ({_first_line(error)}). "
            "Expected a full-model file whose classes can be imported. Fix: import or define the model's "
            "class before loading, or re-save its weights with torch.save(model.state_dict(), ...)."
        )
    return _corrupt_error(path, "PyTorch", error)


def _is_plain_pickle(path: Path) -> bool:
    """A file that is exactly one complete pickle; torch's legacy format is several, then raw bytes."""
    with open(path, "rb") as f:
        try:
            for _ in pickletools.genops(f):
                pass
        except Exception:  # not a pickle, or a damaged one
            return False
        return f.read(1) == b""


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):  # ValueError: a damaged name; torch.load reports the damage
        return False


def _changed_entry(path: Path) -> str | None:
    """The first entry of a torch.save zip whose bytes no longer match their recorded CRC-32 (None: all match).

    torch.load does not check them, so a flipped byte in a tensor would load as a silently different weight. Reading
    the file once costs about what hashing it does (~30 ms for 45 MB here). Entries recorded with CRC 0 are skipped:
    torch writes none when ``torch.utils.serialization.config.save.compute_crc32`` is off.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                try:
                    with archive.open(info) as f:
                        while f.read(1 << 24):
                            pass
                except zipfile.BadZipFile:  # "Bad CRC-32 for file ..."
                    return info.filename
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):  # damaged elsewhere: torch.load reports it
        return None
    return None


def _unsafe_globals(path: Path, is_zip: bool) -> list[str]:
    """Name the classes/functions a file would import when unpickled; disassembling never executes them."""
    try:
        if is_zip:
            with zipfile.ZipFile(path) as archive:
                pkl = next(n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl")
                with archive.open(pkl) as f:
                    found = _pickle_globals(f, max_pickles=1)
        else:
            # torch's legacy format is five pickles, then raw storage bytes that must not be disassembled.
            with open(path, "rb") as f:
                found = _pickle_globals(f, max_pickles=5)
    except (
        OSError,
        StopIteration,
        zipfile.BadZipFile,
    ):  # a damaged archive: the caller reports it as corrupt
        return []
    # Private, but it is the allowlist torch.serialization.get_unsafe_globals_in_checkpoint uses too.
    from torch import _weights_only_unpickler

    allowed = set(_weights_only_unpickler._get_allowed_globals()) | {
        f"{g.__module__}.{g.__name__}" for g in torch.serialization.get_safe_globals() if callable(g)
    }
    return [name for name in found if name not in allowed]


def _pickle_globals(f: IO[bytes], max_pickles: int) -> list[str]:
    """The GLOBAL references of the pickles at the start of a stream, in order (the outer class first)."""
    found: dict[str, None] = {}
    for _ in range(max_pickles):
        pushed: list[Any] = []
        memo: dict[int, Any] = {}
        try:
            for opcode, arg, _pos in pickletools.genops(f):
                name = opcode.name
                if name in ("GLOBAL", "INST"):
                    found[str(arg).replace(" ", ".")] = None
                elif name == "STACK_GLOBAL" and len(pushed) >= 2:
                    found[f"{pushed[-2]}.{pushed[-1]}"] = None
                elif name == "MEMOIZE" and pushed:
                    memo[len(memo)] = pushed[-1]
                elif name in ("PUT", "BINPUT", "LONG_BINPUT") and pushed and isinstance(arg, int):
                    memo[arg] = pushed[-1]
                elif name in ("GET", "BINGET", "LONG_BINGET") and isinstance(arg, int):
                    pushed.append(memo.get(arg))
                else:
                    pushed.append(arg if isinstance(arg, str) else None)
        except Exception:  # the end of the pickles, or damage: what was found so far is the answer
            break
    return list(found)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def _corrupt_error(path: Path, fmt: str, error: BaseException) -> ArtifactError:
    return ArtifactError(
        f"{path} could not be read as a {fmt} file ({type(error).__name__}: {_first_line(error)}). Expected "
        "a complete file written by torch.save, Lightning or safetensors; this one is truncated or corrupt, "
        "for example by an interrupted save, copy or download. Fix: copy the file again, or use another "
        "checkpoint or registry version."
    )


def _is_lightning(obj: dict[Any, Any]) -> bool:
    markers = ("pytorch-lightning_version", "epoch", "global_step")
    return isinstance(obj.get("state_dict"), dict) and any(m in obj for m in markers)


def _from_loaded(obj: Any, path: Path) -> Artifact:
    if isinstance(obj, torch.nn.Module):
        is_lightning = any(cls.__name__ == "LightningModule" for cls in type(obj).__mro__)
        state_dict = obj.state_dict()
        state_dict = _network_keys(state_dict) if is_lightning else strip_wrapper_prefixes(state_dict)
        return Artifact(_checked(state_dict, path), None, path, "full_model", None)
    if not isinstance(obj, dict):
        raise ArtifactError(
            f"{path} holds a {type(obj).__name__}, expected a state_dict (a dict of tensors), a Lightning "
            "checkpoint or a full model. Fix: point to the weights file itself."
        )
    if _is_lightning(obj):
        metadata = obj.get("retrain") if isinstance(obj.get("retrain"), dict) else None
        state_dict = _network_keys(_checked(obj["state_dict"], path))
        return Artifact(state_dict, metadata, path, "lightning", None, checkpoint=obj)
    for wrapper in ("state_dict", "model"):  # e.g. torchvision's reference scripts save {"model": ..., ...}
        inner = obj.get(wrapper)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    return Artifact(strip_wrapper_prefixes(_checked(obj, path)), None, path, "state_dict", None)


def _checked(state_dict: dict[Any, Any], path: Path) -> dict[str, torch.Tensor]:
    not_tensors = [str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if state_dict and not not_tensors:
        return {str(k): v for k, v in state_dict.items()}
    shown = ", ".join(not_tensors[:8]) + (", ..." if len(not_tensors) > 8 else "")
    if len(not_tensors) < len(state_dict):
        what = f"holds entries that are not tensors ({shown})"
    else:
        what = f"holds no tensors (keys: {shown})" if state_dict else "holds no tensors"
    raise ArtifactError(
        f"{path} {what}. Expected model weights: a state_dict mapping parameter names to tensors, or a "
        "Lightning checkpoint with one under 'state_dict'. It may be a saved config, results or optimizer "
        "state. Fix: point to the model's checkpoint or weights file."
    )

"""Hot swap: follow a registry reference such as `demo@latest` and serve each newly published version.

The new version is loaded and warmed up in a worker thread while the old one keeps answering; then one
assignment makes it the version new requests get. Requests already preprocessed finish on the version that
preprocessed them (see batcher.py), so none fails and each response names the version that answered it.
A version that cannot be loaded is logged, counted in /metrics, and skipped until `latest` moves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

from retrain.artifacts.registry import LATEST, resolve
from retrain.errors import ConfigError, RegistryError
from retrain.serving.metrics import ServeMetrics
from retrain.serving.served_model import ModelSlot, ServedModel

log = logging.getLogger("retrain")


def check_watchable(source: str, folder: Path | None) -> None:
    """serve.watch needs a reference that can move: `name@latest` or a bare registry name."""
    version = source.partition("@")[2]
    if folder is None or Path(source).expanduser().exists() or version not in ("", LATEST):
        name = folder.parent.name if folder is not None else "NAME"
        raise ConfigError(
            f"serve.watch=true follows a registry reference that moves when a version is published, but "
            f"ckpt_path={source} is fixed. Expected ckpt_path=<name>@latest. Fix: ckpt_path={name}@latest, "
            "or serve.watch=false to serve this model as it is."
        )


async def in_daemon_thread(function: Callable[[str], ServedModel], argument: str) -> ServedModel:
    """`function(argument)` in a daemon thread: a load still running at SIGTERM must not hold the exit past grace_s.

    (asyncio.to_thread's pool threads are joined when the process exits.)
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[ServedModel] = loop.create_future()

    def work() -> None:
        result: ServedModel | None = None
        error: BaseException | None = None
        try:
            result = function(argument)
        except BaseException as e:
            error = e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the server has stopped
            loop.call_soon_threadsafe(_settle, future, result, error)

    threading.Thread(target=work, name="hot-swap-load", daemon=True).start()
    return await future


def _settle(future: asyncio.Future[ServedModel], result: ServedModel | None, error: BaseException | None) -> None:
    if future.done():  # the watcher was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


class VersionWatcher:
    """Polls the registry every `interval_s` and puts each new version that loads into `slot`."""

    def __init__(
        self,
        slot: ModelSlot,
        *,
        reference: str,
        model_dir: Path,
        interval_s: float,
        load: Callable[..., ServedModel],
        metrics: ServeMetrics,
    ) -> None:
        self.slot = slot
        self.reference = reference
        self.model_dir = model_dir
        self.interval_s = interval_s
        self.load = load
        self.metrics = metrics
        self._failed: set[Path] = set()
        self._release_pending = False

    async def run(self) -> None:
        """Check for a new version every interval, until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()

    async def check(self) -> None:
        """Swap to the version the reference names now, if it is new and loads; otherwise keep the current one."""
        if self._release_pending:
            self._release_pending = False
            await asyncio.to_thread(release_freed_memory)
        try:
            folder = await asyncio.to_thread(resolve, self.model_dir, self.reference)
        except RegistryError as e:  # e.g. the registry folder is being moved: try again next time
            log.warning("hot swap: cannot resolve %s (%s); still serving %s", self.reference, e, self.slot.model.label)
            return
        old = self.slot.model
        if folder == old.folder or folder in self._failed:
            return
        log.info("hot swap: %s now names %s; loading it while %s answers", self.reference, folder, old.label)
        try:
            new = await in_daemon_thread(partial(self.load, keep=old.backend.kind), str(folder))
        except Exception as e:  # any failure of the new version must leave the old one serving
            self._failed.add(folder)
            self.metrics.swaps.labels("failed").inc()
            log.error("hot swap: %s failed to load, still serving %s: %s", folder, old.label, e)
            self._release_pending = True
            return
        self.slot.model = new
        self.metrics.swaps.labels("ok").inc()
        self.metrics.serving(new.label, new.backend.kind, previous=(old.label, old.backend.kind))
        log.info("hot swap: now serving %s (%s backend), was %s", new.label, new.backend.kind, old.label)
        # The old version is freed once its queued images are answered; the next check hands its memory back.
        self._release_pending = True


def release_freed_memory() -> None:
    """Hand memory freed by an old version (and by loading the new one) back to the OS.

    glibc keeps freed heap memory, in the arena of the thread that used it, for reuse; after a swap that is a
    whole model's weights and load buffers, so resident memory would grow with every swap. malloc_trim(0)
    releases it; elsewhere (macOS, musl) there is no such call and nothing is done.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)

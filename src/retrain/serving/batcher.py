"""Dynamic batching: images from concurrent requests share one model call, in a thread of its own.

Only images that decoded and preprocessed cleanly reach the queue, so a bad upload is answered on its own and
never shares a batch. A batch closes when it holds `max_batch_size` images, when its oldest image has waited
`batch_timeout_ms`, or when no other image is being decoded (none could join, so waiting would only add
latency: a lone request goes at once). Images that queued while the model was busy have waited already and go
at once. A batch holds images of one model version only: during a hot swap each image is answered by the version that
preprocessed it, whose classes and input size it was made for.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from retrain.serving.metrics import ServeMetrics
from retrain.serving.served_model import Answer, ServedModel


@dataclass
class _Job:
    model: ServedModel
    image: torch.Tensor
    future: asyncio.Future[Answer]
    queued: float


class Batcher:
    """Queue preprocessed images and answer them in batches; `run` is the loop, `submit` awaits one answer."""

    def __init__(self, max_batch_size: int, timeout_ms: float, metrics: ServeMetrics) -> None:
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_ms / 1000
        self.metrics = metrics
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._held: _Job | None = None  # the first image of the next batch (another version than the last one's)
        self._coming = 0  # images being decoded now, which may still join the batch being formed
        # One thread: model calls never overlap, and torch's own threads parallelize each call.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="model")

    @contextlib.contextmanager
    def coming(self) -> Iterator[None]:
        """Mark an image as on its way (being decoded), so a forming batch waits for it up to the timeout."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1

    async def submit(self, model: ServedModel, image: torch.Tensor) -> Answer:
        """Queue one preprocessed image for `model` and wait for its top-k answer."""
        loop = asyncio.get_running_loop()
        job = _Job(model, image, loop.create_future(), loop.time())
        self._queue.put_nowait(job)
        self.metrics.queue_depth.inc()
        return await job.future

    async def run(self) -> None:
        """Form batches and run them, one after the other, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(loop)
            self.metrics.queue_depth.dec(len(batch))
            now = loop.time()
            for job in batch:
                self.metrics.queue_seconds.observe(now - job.queued)
            self.metrics.batch_size.observe(len(batch))
            try:
                answers = await loop.run_in_executor(self._executor, self._call, batch)
            except Exception as e:  # the model itself failed: every image of this batch gets the error (a 500)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            for job, answer in zip(batch, answers, strict=True):
                if not job.future.done():  # its client may have gone away
                    job.future.set_result(answer)

    def _call(self, batch: list[_Job]) -> list[Answer]:
        start = time.perf_counter()
        answers = batch[0].model.answer(torch.stack([job.image for job in batch]))
        self.metrics.inference_seconds.observe(time.perf_counter() - start)
        return answers

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[_Job]:
        first = self._held or await self._queue.get()
        self._held = None
        batch = [first]
        deadline = first.queued + self.timeout_s
        while len(batch) < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0 or not self._coming:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                job = self._queue.get_nowait()
            if job.model is not first.model:
                self._held = job
                break
            batch.append(job)
        return batch

    async def close(self, runner: asyncio.Task[None]) -> None:
        """Stop the loop (after the server has answered what was in flight) and release the model thread."""
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        self._executor.shutdown(wait=True)

"""A callback that times the training steps of a real `train.py` run, for bench/train_throughput.py.

Added from the command line, so the run is otherwise the user's own:
`+callbacks.probe._target_=_probe.ThroughputProbe +callbacks.probe.out=FILE +callbacks.probe.warmup=1`
(with bench/ on PYTHONPATH). The clock starts when batch `warmup` begins, after its loading, and stops when the
last batch ends, as in baseline.plain_loop, so both windows hold the same work: steps, loading, our logging.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from _machine import peak_rss_mib


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class ThroughputProbe(L.Callback):
    """Writes images/s, images, wall and CPU seconds, peak RSS, loader workers and precision to `out` at the end."""

    def __init__(self, out: str, warmup: int = 1) -> None:
        self.out = Path(out)
        self.warmup = warmup
        self.start: float | None = None
        self.end = 0.0
        self.cpu_start = self.cpu_end = 0.0
        self.images = 0
        self.peak = 0.0
        self.made_at = time.time()  # built with the Trainer: after imports, config, data scan and model (startup.py)
        self.first_batch_at = 0.0  # when the first batch reached training: bench/startup.py's end point
        # Seconds from the end of batch b (this callback's hook: Lightning runs checkpoint callbacks after it, so a
        # rolling save falls inside) to the start of batch b + 1, keyed by b: checkpoint_overhead.py's per-save cost.
        self.gaps: dict[int, float] = {}
        self._ended_at: float | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Note when training begins; start the clock at the first timed batch."""
        if not self.first_batch_at:
            self.first_batch_at = time.time()
        if self._ended_at is not None:
            self.gaps[batch_idx - 1] = time.perf_counter() - self._ended_at
        if batch_idx == self.warmup and self.start is None:
            _sync()
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count the images of every timed batch; the last one stops the clock."""
        if self.start is not None:
            if batch_idx == trainer.num_training_batches - 1:  # queued GPU work belongs to the window
                _sync()
            self.end, self.cpu_end = time.perf_counter(), time.process_time()
            self.images += len(batch[1])
            self.peak = peak_rss_mib()  # before validation, which the plain loop does not run
        self._ended_at = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the figures for the parent process."""
        if self.start is None:
            raise RuntimeError(f"ThroughputProbe: training ended before batch {self.warmup}; raise limit_train_batches")
        seconds = self.end - self.start
        loader = trainer.train_dataloader
        figures = {
            "images_per_s": self.images / seconds,
            "images": self.images,
            "seconds": seconds,
            "cpu_seconds": self.cpu_end - self.cpu_start,
            "peak_rss_mib": self.peak,
            "workers": getattr(loader, "num_workers", None),
            "precision": str(trainer.precision),
            "made_at": self.made_at,
            "gaps": self.gaps,
            "first_batch_at": self.first_batch_at,
        }
        self.out.write_text(json.dumps(figures))

"""Serve: answer HTTP requests with any published model or exported file, batched, until SIGTERM."""

from __future__ import annotations

import logging
import warnings
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from PIL import Image

from retrain.serving.app import create_app
from retrain.serving.backends import version_folder
from retrain.serving.hot_swap import VersionWatcher, check_watchable
from retrain.serving.metrics import ServeMetrics
from retrain.serving.served_model import ModelSlot, load_served_model
from retrain.serving.server import bind, run_server, stop_cleanly_before_serving
from retrain.serving.settings import ServeSettings

log = logging.getLogger("retrain")


def serve(cfg: DictConfig) -> dict[str, Any]:
    """Load and warm up the model, then serve it on serve.host:serve.port until stopped."""
    settings = ServeSettings.from_config(cfg.serve)
    source, model_dir = str(cfg.ckpt_path), Path(cfg.paths.model_dir)
    if settings.watch:
        check_watchable(source, version_folder(source, model_dir))
    bind(settings.host, settings.port).close()  # a port in use is reported now, not after the model has loaded
    # The server rejects images over Pillow's pixel limit itself (a 413 naming the size); the warning is noise.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    load = partial(load_served_model, settings=settings, model_dir=model_dir, allow_pickle=bool(cfg.allow_pickle))
    with stop_cleanly_before_serving():
        slot = ModelSlot(load(source))
    model = slot.model
    log.info(
        "%s: %s backend on %s, because %s", model.label, model.backend.kind, model.backend.device, model.backend.reason
    )
    metrics = ServeMetrics()
    watcher = (
        VersionWatcher(
            slot,
            reference=source,
            model_dir=model_dir,
            interval_s=settings.watch_interval_s,
            load=load,
            metrics=metrics,
        )
        if settings.watch
        else None
    )
    app = create_app(slot, settings, metrics, watcher)
    if settings.public:
        log.warning(
            "serve.host=%s: every machine that can reach this one can call the server, which has no "
            "authentication. Put it behind a proxy that has, or use serve.host=127.0.0.1.",
            settings.host,
        )
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info(
        "serving %s at http://%s:%d (POST /predict, /predict/batch; GET /health, /info, /metrics)%s; "
        "batches of up to %d images, waiting at most %g ms",
        model.label,
        host,
        settings.port,
        f", following {source}" if watcher else "",
        settings.max_batch_size,
        settings.batch_timeout_ms,
    )
    run_server(app, settings)
    log.info("stopped; the last version served was %s", slot.model.label)
    return {"status": "ok", "model": slot.model.label}

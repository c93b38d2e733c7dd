"""The FastAPI app: /predict, /predict/batch, /health, /info and /metrics over a served model and its batcher.

A request's image is read, then decoded and preprocessed in a thread pool, outside the model's path; only a
clean tensor joins the batch queue. Anything wrong with a request is a RequestError, answered as 4xx JSON
that names the problem, and touches no other request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrain.serving.batcher import Batcher
from retrain.serving.body_limit import BodyLimit
from retrain.serving.hot_swap import VersionWatcher
from retrain.serving.metrics import RequestMetrics, ServeMetrics
from retrain.serving.served_model import Answer, ModelSlot, ServedModel
from retrain.serving.settings import ServeSettings
from retrain.serving.uploads import RequestError, form_images, single_image

_MULTIPART_OVERHEAD = 64 * 1024  # per file of /predict/batch: part headers and boundaries


@dataclass
class ServerState:
    """What the routes share: the model slot, settings, metrics, the batcher and the decode threads."""

    slot: ModelSlot
    settings: ServeSettings
    metrics: ServeMetrics
    batcher: Batcher
    decoder: ThreadPoolExecutor
    decode_threads: int
    watcher: VersionWatcher | None = None
    started: float = field(default_factory=time.time)


def create_app(
    slot: ModelSlot, settings: ServeSettings, metrics: ServeMetrics, watcher: VersionWatcher | None
) -> FastAPI:
    """The app with its middleware (metrics outermost, then the body limit) and routes; state in app.state.serve."""
    threads = settings.decode_threads or os.cpu_count() or 1
    state = ServerState(
        slot,
        settings,
        metrics,
        Batcher(settings.max_batch_size, settings.batch_timeout_ms, metrics),
        ThreadPoolExecutor(threads, thread_name_prefix="decode"),
        threads,
        watcher,
    )
    metrics.serving(slot.model.label, slot.model.backend.kind)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runner = asyncio.create_task(state.batcher.run(), name="batcher")
        watching = asyncio.create_task(watcher.run(), name="watcher") if watcher else None
        try:
            yield
        finally:  # uvicorn has answered every request in flight (or given up after grace_s)
            if watching is not None:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            await state.batcher.close(runner)
            state.decoder.shutdown(wait=False, cancel_futures=True)

    # No generated docs: the endpoints read raw bodies, which an OpenAPI schema cannot describe usefully.
    app = FastAPI(title="retrain serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    batch_limit = settings.max_files * (settings.max_body_bytes + _MULTIPART_OVERHEAD)
    app.add_middleware(
        BodyLimit, limit_for=lambda path: batch_limit if path == "/predict/batch" else settings.max_body_bytes
    )
    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        metrics.rejected.labels(error.kind).inc()
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # Starlette's own 4xx (unknown path, wrong method, a malformed multipart body) in the same JSON shape.
        kind = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "bad_request")
        body = {
            "error": kind,
            "detail": f"{request.method} {request.url.path}: {error.detail}",
            "status": error.status_code,
        }
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    @app.api_route("/predict", methods=["POST", "PUT"])  # PUT: what `curl -T photo.jpg URL` sends
    async def predict(request: Request) -> JSONResponse:
        data = await single_image(request)
        model = state.slot.model  # this request's version, from preprocessing to answer
        answer = await _answer(state, model, data)
        return JSONResponse(_result(answer, model))

    @app.post("/predict/batch")
    async def predict_batch(request: Request) -> JSONResponse:
        items = await form_images(request, settings.max_files, settings.max_body_bytes)
        model = state.slot.model
        results = await asyncio.gather(*(_item(state, model, name, item) for name, item in items))
        return JSONResponse({"model": model.label, "results": list(results)})

    @app.get("/health")
    async def health() -> JSONResponse:
        # The socket is bound only after the model loaded and answered a warm-up batch, and it is closed first
        # on SIGTERM: whoever can connect gets a server ready to answer.
        return JSONResponse({"status": "ok", "model": state.slot.model.label})

    @app.get("/info")
    async def info() -> JSONResponse:
        return JSONResponse(_info(state))

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _answer(state: ServerState, model: ServedModel, data: bytes) -> Answer:
    loop = asyncio.get_running_loop()
    with state.batcher.coming():
        image = await loop.run_in_executor(state.decoder, model.preprocess, data)
    return await state.batcher.submit(model, image)


async def _item(state: ServerState, model: ServedModel, name: str, item: bytes | RequestError) -> dict[str, Any]:
    try:
        if isinstance(item, RequestError):
            raise item
        return {"filename": name, **_result(await _answer(state, model, item), model)}
    except RequestError as error:  # this file's problem, answered in its own entry
        state.metrics.rejected.labels(error.kind).inc()
        return {"filename": name, **error.body()}


def _result(answer: Answer, model: ServedModel) -> dict[str, Any]:
    return {
        "label": answer[0][0],
        "probabilities": [{"label": label, "p": p} for label, p in answer],
        "model": model.label,
    }


def _info(state: ServerState) -> dict[str, Any]:
    settings = state.settings
    return {
        **state.slot.model.describe(),
        "batching": {"max_batch_size": settings.max_batch_size, "batch_timeout_ms": settings.batch_timeout_ms},
        "limits": {"max_body_mb": settings.max_body_mb, "max_files": settings.max_files},
        "decode_threads": state.decode_threads,
        "watch": {
            "enabled": state.watcher is not None,
            "reference": state.watcher.reference if state.watcher else None,
            "interval_s": settings.watch_interval_s,
        },
        "uptime_s": round(time.time() - state.started, 1),
    }

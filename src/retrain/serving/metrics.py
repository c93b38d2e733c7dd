"""What /metrics shows, in Prometheus text: requests by status, latency, batch sizes, queue time, swaps.

One registry per app (not prometheus_client's global one), so two servers in one process never mix figures.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ENDPOINTS = ("/predict", "/predict/batch", "/health", "/info", "/metrics")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """The server's counters and histograms, registered in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "retrain_serve_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "retrain_serve_request_seconds",
            "Time from request to response",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_progress = Gauge("retrain_serve_requests_in_progress", "Requests being handled now", registry=r)
        self.batch_size = Histogram(
            "retrain_serve_batch_size", "Images per model call (dynamic batching)", buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "retrain_serve_queue_seconds", "Time an image waits for its batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "retrain_serve_inference_seconds", "Time of one model call", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("retrain_serve_queue_depth", "Images waiting for the model", registry=r)
        self.rejected = Counter(
            "retrain_serve_rejected_images", "Images answered with a 4xx, by kind", ["kind"], registry=r
        )
        self.swaps = Counter(
            "retrain_serve_model_swaps", "Hot swaps to a new version, by outcome", ["outcome"], registry=r
        )
        self.model = Gauge(
            "retrain_serve_model", "1 for the version that answers now", ["model", "backend"], registry=r
        )

    def serving(self, label: str, backend: str, previous: tuple[str, str] | None = None) -> None:
        """Point the model gauge at the version that answers from now on."""
        if previous is not None:
            self.model.remove(*previous)
        self.model.labels(label, backend).set(1)

    def text(self) -> bytes:
        """Everything in the Prometheus text format."""
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware counting every HTTP response by endpoint and status, with its latency."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Time the request and count its status (500 when the app fails before answering)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"  # bounded label values
        status = 500
        start = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.in_progress.dec()
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

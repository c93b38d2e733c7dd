"""Run the app under uvicorn on a socket bound here, and shut down gracefully on SIGTERM with exit status 0.

uvicorn already drains on SIGTERM (stops accepting, finishes requests in flight, then gives up after
`timeout_graceful_shutdown`), but afterwards it re-raises the signal, so the process ends as killed by it
(status 143) rather than as a clean stop. The subclass below keeps the draining and drops the re-raise.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import socket
from collections.abc import Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from retrain.errors import ConfigError
from retrain.serving.settings import ServeSettings

log = logging.getLogger("retrain")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulServer(uvicorn.Server):
    """uvicorn's server; on SIGTERM or Ctrl+C it drains and returns normally."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Handle the stop signals while serving; restore the previous handlers after, without re-raising."""
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def stop_cleanly_before_serving() -> Iterator[None]:
    """While the model loads and warms up, SIGTERM ends the process at once with exit 0: no request is in flight.

    Without this, SIGTERM's default action would kill the process mid-load (status 143, as if it had failed), and a
    supervisor that cancels a roll-out would read a clean stop as a crash.
    """

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("SIGTERM before serving started: stopped (no request was in flight)")
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; a port in use is a ConfigError that says how to pick another."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        problem = "is in use by another process" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
        raise ConfigError(
            f"serve.port={port} on {host} {problem}. Expected a free port. Fix: serve.port=<another port>, or stop "
            "the process that holds it."
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(app: FastAPI, settings: ServeSettings) -> None:
    """Serve until SIGTERM/SIGINT; requests in flight get up to serve.grace_s to finish."""
    sock = bind(settings.host, settings.port)
    config = uvicorn.Config(
        app,
        log_config=None,  # keep the logging Hydra set up: uvicorn's lines go to the console and the run's log
        access_log=settings.access_log,
        timeout_graceful_shutdown=max(1, round(settings.grace_s)),
        server_header=False,
    )
    GracefulServer(config).run(sockets=[sock])

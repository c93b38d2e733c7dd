"""Refuse request bodies over serve.max_body_mb with a 413 before they are buffered in memory.

A Content-Length over the limit is answered at once; the body is read and dropped (up to a bound) first, so
the client, still sending, reads the 413 instead of a reset connection. A chunked body is counted as it
arrives and stopped at the limit. (Starlette's RequestBodyLimitMiddleware answers a plain "Content Too Large"
without draining; clients here get JSON naming the size and serve.max_body_mb.)
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrain.serving.uploads import too_large

_DRAIN_FACTOR = 4  # bodies up to 4x the limit are read to their end before the 413; larger ones are cut off


class BodyLimit:
    """ASGI middleware: `limit_for(path)` is the largest body, in bytes, each path accepts."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 413 for a declared length over the limit; otherwise count the body as the app reads it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            if declared <= _DRAIN_FACTOR * limit:
                await _drain(receive)
            error = too_large(declared, limit)
            response = JSONResponse(error.body(), status_code=error.status, headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(seen, limit)
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return

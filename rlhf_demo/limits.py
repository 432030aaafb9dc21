"""Limits that hold before any work: request size, routes the app never uses, proxy headers.

A request body is refused past a byte cap without being read (a declared length is checked
from the headers; a chunked body is counted as it arrives), so one request cannot make the
server hold hundreds of megabytes. The app takes no files, so Gradio's upload routes are
refused outright. Which client address a request comes from is the app's decision alone
(``visitors.client_address``): uvicorn must not rewrite it from ``X-Forwarded-For``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from starlette.exceptions import HTTPException

# Gradio routes that write client files to the server's temp dir; this app has no file input.
REFUSED_ROUTES = ("/gradio_api/upload", "/gradio_api/process_recording")


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a streamed body passes the cap; an HTTPException, so the
    framework answers 413 instead of its generic "error parsing the body"."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over the limit of {limit} bytes")


async def _reply(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length header's value; None when absent; -1 when it is not a number."""
    for key, value in headers:
        if key.lower() == b"content-length":
            return int(value) if value.strip().isdigit() else -1
    return None


def refused_route(path: str) -> bool:
    """Whether ``path`` is one of :data:`REFUSED_ROUTES` (any mount prefix, trailing slash)."""
    path = path.rstrip("/")
    return any(path.endswith(route) for route in REFUSED_ROUTES)


class RequestLimits:
    """ASGI middleware: refuse uploads (403) and bodies over ``max_body_bytes`` (413) before
    the app reads them."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if refused_route(scope.get("path", "")):
            await _reply(send, 403, "this app takes no file uploads")
            return
        declared = _declared_length(scope.get("headers", []))
        if declared is not None and declared < 0:
            await _reply(send, 400, "Content-Length is not a number")
            return
        if declared is not None and declared > self.max_body_bytes:
            await _reply(send, 413, f"request body of {declared} bytes is over the limit of {self.max_body_bytes}")
            return
        received, started = 0, False

        async def counted_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge as exc:  # read outside a route, where no framework answers it
            if started:
                raise
            await _reply(send, 413, str(exc.detail))


def trust_forwarded_headers(trust_proxy: bool) -> None:
    """Tell uvicorn (before Gradio starts it) whose ``X-Forwarded-*`` headers to apply.

    uvicorn rewrites the client address from ``X-Forwarded-For`` for peers in
    ``FORWARDED_ALLOW_IPS`` (default: loopback), so without a proxy any same-host tunnel
    lets a client name its own address. ``trust_proxy`` off: nobody is trusted. On: the
    operator's value or uvicorn's loopback default stays (the app then reads the proxy's
    last ``X-Forwarded-For`` entry itself)."""
    if not trust_proxy:
        os.environ["FORWARDED_ALLOW_IPS"] = ""

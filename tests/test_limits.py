"""Limits before work: bodies past the cap, uploads and spoofed X-Forwarded-For are refused
by the served app before it reads or trusts them; over-long text is refused before any
per-character work."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from rlhf_demo.store.errors import InvalidInputError
from rlhf_demo.store.validate import MAX_TEXT_BYTES, check_str
from rlhf_demo.ui.handlers import UserError
from rlhf_demo.ui.handlers.checks import check_message

MiB = 1 << 20


class Tripwire(str):
    """Text whose per-character operations fail the test: only ``len`` is allowed."""

    def _touched(self, *args, **kwargs):
        raise AssertionError("per-character work on an over-long text")

    __iter__ = __contains__ = strip = encode = replace = translate = _touched


def test_an_over_long_message_is_refused_before_per_character_work(settings):
    limits = settings.limits
    with pytest.raises(UserError, match="too long"):
        check_message(Tripwire("a" * (limits.max_message_chars + 1)), limits)
    assert check_message("  a\x07 b  ", limits) == "a b"  # short text is still cleaned


def test_an_over_long_store_text_is_refused_before_per_character_work():
    with pytest.raises(InvalidInputError, match="over the limit"):
        check_str("prompt", Tripwire("a" * (MAX_TEXT_BYTES + 1)), MAX_TEXT_BYTES)
    with pytest.raises(InvalidInputError, match="over the limit"):
        check_str("prompt", "é" * (MAX_TEXT_BYTES // 2 + 1), MAX_TEXT_BYTES)  # bytes, not characters


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b"x" * size


def test_bodies_over_the_cap_are_refused_declared_or_chunked(app_url, runtime):
    cap = runtime.settings.limits.max_request_bytes
    join = app_url + "gradio_api/queue/join"
    declared = httpx.post(join, content=b"x" * (cap + 1), headers={"content-type": "application/json"})
    assert declared.status_code == 413
    chunked = httpx.post(join, content=_chunks(cap + 128 * 1024), headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    small = httpx.post(join, json={"data": [], "fn_index": 9999, "session_hash": "x" * 10})
    assert small.status_code not in (413, 500)  # under the cap: the app answers as before


def test_uploads_are_refused(app_url):
    for path in ("gradio_api/upload", "gradio_api/upload/", "gradio_api/process_recording"):
        refused = httpx.post(app_url + path, files={"files": ("a.txt", b"hello")})
        assert refused.status_code == 403, path


async def _echo_client(scope, receive, send) -> None:
    """An ASGI app that answers with the client address uvicorn gave it."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": (scope.get("client") or ("?",))[0].encode()})


def test_forwarded_for_is_not_applied_by_uvicorn_without_trust_proxy(monkeypatch):
    """Gradio starts uvicorn with its defaults, which apply X-Forwarded-For from loopback
    peers: a same-host tunnel would let any client choose its address."""
    from gradio import http_server

    from rlhf_demo.limits import trust_forwarded_headers

    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")  # uvicorn's default, restored after
    trust_forwarded_headers(False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = http_server.start_server(_echo_client, server_name="127.0.0.1", server_port=port)[3]
    try:
        seen = httpx.get(f"http://127.0.0.1:{port}/", headers={"x-forwarded-for": "203.0.113.7"}).text
    finally:
        server.close()
    assert seen == "127.0.0.1"

"""Who is voting: a server-issued visitor id in a signed cookie, and the visitor's network.

Gradio's ``session_hash`` is chosen by the client (a fresh one per page load, or per API
call), so it is only a *page session*: never an identity. The identity is a random id the
server issues in an HMAC-signed cookie; a client cannot pick someone else's id, so caps,
ownership and "delete my data" all key on it. Dropping the cookie makes a new visitor,
which is why votes are also limited per client address (``ip_key``): the address is kept
only as a keyed hash, and ``X-Forwarded-For`` is read only when ``trust_proxy`` says the
app runs behind a proxy that sets it (Hugging Face Spaces does).

The secret comes from ``RLHF_DEMO_SECRET`` or is generated once into the data directory
(mode 0600), so cookies stay valid across restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COOKIE = "rlhf_visitor"
SECRET_ENV = "RLHF_DEMO_SECRET"
SECRET_FILE = "visitor-secret"
# Set by the middleware on every request, after dropping any copy the client sent.
HEADER_ID = "x-rlhf-visitor"
HEADER_NEW = "x-rlhf-visitor-new"
COOKIE_MAX_AGE_S = 365 * 24 * 3600
ID_BYTES = 16


@dataclass(frozen=True)
class Visitor:
    """A voter: the server-issued id and a keyed hash of their network address (or None
    when unknown, e.g. offline tools and direct handler calls)."""

    id: str
    ip_key: str | None = None


def load_secret(data_dir: Path, env: dict[str, str] | None = None) -> bytes:
    """``RLHF_DEMO_SECRET``, else the data dir's secret file, created once with mode 0600."""
    env = dict(os.environ if env is None else env)
    if env.get(SECRET_ENV):
        return env[SECRET_ENV].encode()
    path = Path(data_dir) / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_bytes().strip()
        if len(secret) < 32:
            raise ValueError(f"{path} holds a secret shorter than 32 bytes; delete it to make a new one") from None
        return secret
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return path.read_bytes().strip()


class Signer:
    """Issues and checks visitor cookies, and hashes client addresses, with one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the visitor secret must be at least 16 bytes")
        self._secret = secret

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._secret, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    def new_id(self) -> str:
        return secrets.token_hex(ID_BYTES)

    def cookie_value(self, visitor_id: str) -> str:
        return f"{visitor_id}.{self._mac('visitor', visitor_id)[:32]}"

    def verify(self, cookie: str | None) -> str | None:
        """The visitor id in a cookie we signed, or None for anything else."""
        if not isinstance(cookie, str) or len(cookie) > 200 or "." not in cookie:
            return None
        visitor_id, _, mac = cookie.partition(".")
        if len(visitor_id) != 2 * ID_BYTES or not all(c in "0123456789abcdef" for c in visitor_id):
            return None
        return visitor_id if hmac.compare_digest(mac, self._mac("visitor", visitor_id)[:32]) else None

    def ip_key(self, address: str | None) -> str | None:
        """A keyed hash of the address: groups votes by network without storing it."""
        return None if not address else self._mac("ip", address)[:24]


def client_address(headers: dict[str, str], peer: str | None, trust_proxy: bool) -> str | None:
    """The client's address: the TCP peer, or with ``trust_proxy`` the address the proxy
    appended last to ``X-Forwarded-For`` (earlier entries are the client's own claims)."""
    if trust_proxy:
        forwarded = [part.strip() for part in headers.get("x-forwarded-for", "").split(",") if part.strip()]
        if forwarded:
            return forwarded[-1][:100]
    return peer


class VisitorMiddleware:
    """ASGI middleware: every HTTP request carries a verified visitor id.

    A request with a valid signed cookie keeps its id; any other gets a new one, set as a
    cookie on the response. The id reaches handlers as the ``x-rlhf-visitor`` header of
    the request (``x-rlhf-visitor-new: 1`` when it was issued just now); copies of these
    headers sent by the client are dropped first. An exception a route lets escape
    becomes a short JSON error (logged in one line), not a stack trace or a bare 500.
    """

    def __init__(self, app: Any, signer: Signer, secure: bool = False) -> None:
        self.app = app
        self.signer = signer
        self.secure = secure

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope.get("headers", []) if k not in (HEADER_ID.encode(), HEADER_NEW.encode())]
        cookie_header = b"; ".join(v for k, v in headers if k == b"cookie").decode("latin-1")
        presented = self.signer.verify(_cookie(cookie_header, COOKIE))
        visitor_id = presented or self.signer.new_id()
        headers += [(HEADER_ID.encode(), visitor_id.encode()), (HEADER_NEW.encode(), b"0" if presented else b"1")]
        if not presented:  # handlers that read request.cookies see the same id
            headers = [(k, v) for k, v in headers if k != b"cookie"]
            value = f"{cookie_header}; {COOKIE}={self.signer.cookie_value(visitor_id)}".lstrip("; ")
            headers.append((b"cookie", value.encode("latin-1")))
        scope = {**scope, "headers": headers}
        started = False

        async def send_with_cookie(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not presented:
                    https = self.secure or scope.get("scheme") == "https"
                    attrs = "; Secure; SameSite=None; Partitioned" if https else "; SameSite=Lax"
                    cookie = f"{COOKIE}={self.signer.cookie_value(visitor_id)}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; HttpOnly{attrs}"
                    message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_cookie)
        except Exception as exc:  # noqa: BLE001 - the client gets a short answer, the log one line
            log.warning("request %s %s failed: %s: %s", scope.get("method"), scope.get("path"), type(exc).__name__, str(exc)[:200])
            if started:
                raise
            body = b'{"error": "bad request: the server could not process it"}'
            await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


class VisitorBook:
    """Which visitor a page session belongs to, for browsers that block the cookie.

    A Space runs inside an iframe, where some browsers drop third-party cookies: each
    request would then carry a new visitor id. A page session (Gradio's session hash)
    keeps the id it was first seen with, but only from the same network, so a guessed
    session hash from elsewhere does not inherit someone's identity. Bounded (LRU).
    """

    def __init__(self, size: int = 50_000) -> None:
        self._size = size
        self._sessions: OrderedDict[str, Visitor] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, session_hash: str | None, visitor: Visitor, issued_now: bool) -> Visitor:
        if not session_hash:
            return visitor
        with self._lock:
            known = self._sessions.get(session_hash)
            if issued_now and known is not None and known.ip_key == visitor.ip_key:
                visitor = known
            self._sessions[session_hash] = visitor
            self._sessions.move_to_end(session_hash)
            while len(self._sessions) > self._size:
                self._sessions.popitem(last=False)
        return visitor


def identify(request: Any, signer: Signer, book: VisitorBook, trust_proxy: bool) -> Visitor:
    """The visitor behind a ``gr.Request``: the id the middleware verified or issued (a
    request that bypassed it gets a fresh one), and the hashed client address."""
    headers = {k.lower(): v for k, v in dict(getattr(request, "headers", None) or {}).items()}
    client = getattr(request, "client", None)
    peer = getattr(client, "host", None) if client is not None else None
    address = client_address(headers, peer, trust_proxy)
    visitor_id = headers.get(HEADER_ID)
    issued_now = headers.get(HEADER_NEW) != "0"
    if not visitor_id:
        visitor_id = signer.verify(_cookie(headers.get("cookie", ""), COOKIE)) or signer.new_id()
    visitor = Visitor(visitor_id, signer.ip_key(address))
    return book.resolve(getattr(request, "session_hash", None), visitor, issued_now)

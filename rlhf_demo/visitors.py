"""Who is voting: a signed-in Hugging Face account or a server-issued visitor id in a signed
cookie, and the visitor's network.

Gradio's ``session_hash`` is chosen by the client and travels in URLs, so it is never an
identity, not even a fallback: knowing it must not make anyone someone else. The identity
is a random id the server issues in an HMAC-signed cookie; a client cannot pick someone
else's id, so caps, ownership and "delete my data" all key on it. On a Space with
``hf_oauth: true`` a visitor may sign in with Hugging Face instead, a stronger identity (one
per account, kept across browsers). Dropping the cookie makes a new visitor, which is why
votes are also limited per client network (``ip_key``: an IPv4 address or an IPv6 /64),
kept only as a keyed hash; ``X-Forwarded-For`` is read only when ``trust_proxy`` says the
app runs behind a proxy that sets it (Hugging Face Spaces does).

The secret comes from ``RLHF_DEMO_SECRET`` or is generated once into the data directory
(mode 0600), so cookies stay valid across restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COOKIE = "rlhf_visitor"
SECRET_ENV = "RLHF_DEMO_SECRET"
SECRET_FILE = "visitor-secret"
# Set by the middleware on every request, after dropping any copy the client sent.
HEADER_ID = "x-rlhf-visitor"
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

    def mac(self, purpose: str, value: str) -> str:
        """A keyed hash of ``value``, separate per ``purpose``."""
        return hmac.new(self._secret, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    def new_id(self) -> str:
        return secrets.token_hex(ID_BYTES)

    def cookie_value(self, visitor_id: str) -> str:
        return f"{visitor_id}.{self.mac('visitor', visitor_id)[:32]}"

    def verify(self, cookie: str | None) -> str | None:
        """The visitor id in a cookie we signed, or None for anything else."""
        if not isinstance(cookie, str) or len(cookie) > 200 or "." not in cookie:
            return None
        visitor_id, _, mac = cookie.partition(".")
        if len(visitor_id) != 2 * ID_BYTES or not all(c in "0123456789abcdef" for c in visitor_id):
            return None
        return visitor_id if hmac.compare_digest(mac, self.mac("visitor", visitor_id)[:32]) else None

    def ip_key(self, address: str | None) -> str | None:
        """A keyed hash of the address's network (:func:`network_of`): groups votes by network without storing it."""
        network = network_of(address)
        return None if not network else self.mac("ip", network)[:24]


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
    the request; a copy of this header sent by the client is dropped first. An exception a route lets escape
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
        headers = [(k, v) for k, v in scope.get("headers", []) if k != HEADER_ID.encode()]
        cookie_header = b"; ".join(v for k, v in headers if k == b"cookie").decode("latin-1")
        presented = self.signer.verify(_cookie(cookie_header, COOKIE))
        visitor_id = presented or self.signer.new_id()
        headers.append((HEADER_ID.encode(), visitor_id.encode()))
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
                    cookie = (
                        f"{COOKIE}={self.signer.cookie_value(visitor_id)}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; HttpOnly{attrs}"
                    )
                    message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_cookie)
        except Exception as exc:  # noqa: BLE001 - the client gets a short answer, the log one line
            log.warning(
                "request %s %s failed: %s: %s", scope.get("method"), scope.get("path"), type(exc).__name__, str(exc)[:200]
            )
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


def network_of(address: str | None) -> str | None:
    """The unit a per-address limit counts: an IPv4 address, or an IPv6 address's /64 (one
    machine is routinely given a whole /64, so counting single IPv6 addresses would let it
    rotate through 2^64 of them). IPv4-mapped IPv6 is the IPv4 address; anything that is not
    an address (a test client's name) stays as it is."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]").split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def oauth_enabled(env: dict[str, str] | None = None) -> bool:
    """Hugging Face sign-in runs only where Gradio runs the real one: on a Space
    (``SYSTEM=spaces``) with ``hf_oauth: true`` (which sets the ``OAUTH_CLIENT_*`` variables).
    Elsewhere Gradio would mock it with a session cookie signed with a key derived from an
    empty secret, which anyone could forge, so there it stays off."""
    env = dict(os.environ if env is None else env)
    on_a_space = env.get("SYSTEM") == "spaces" and env.get("SPACE_ID")
    return bool(on_a_space and env.get("OAUTH_CLIENT_ID") and env.get("OAUTH_CLIENT_SECRET"))


def oauth_visitor_id(signer: Signer, userinfo: Any) -> str | None:
    """The visitor id of a signed-in Hugging Face account: keyed on the account's stable ``sub``
    (a user can rename themselves), shaped like a cookie id so the store treats both alike."""
    subject = userinfo.get("sub") if isinstance(userinfo, dict) else None
    if not isinstance(subject, str) or not subject or len(subject) > 200:
        return None
    return signer.mac("hf-account", subject)[: 2 * ID_BYTES]


def _oauth_userinfo(request: Any) -> dict[str, Any] | None:
    """The signed-in account in the request's OAuth session (Gradio's SessionMiddleware), if any.
    Read from the Starlette request a ``gr.Request`` wraps where there is one (a plain dict),
    else from the ``gr.Request`` itself (which turns dicts into objects: made plain again)."""
    for holder in (getattr(request, "request", None), request):
        try:
            session = getattr(holder, "session", None)
        except AssertionError:  # Starlette: no SessionMiddleware installed
            session = None
        if session is None or not hasattr(session, "keys"):
            continue
        info = dict(session).get("oauth_info")
        info = dict(info) if info is not None and hasattr(info, "keys") else None
        if info is None:
            continue
        expires_at = info.get("expires_at")
        if isinstance(expires_at, (int, float)) and expires_at < time.time():
            return None
        userinfo = info.get("userinfo")
        return dict(userinfo) if userinfo is not None and hasattr(userinfo, "keys") else None
    return None


def login_button() -> Any:
    """The "Sign in with Hugging Face" button on a Space with OAuth, else nothing (None): the
    signed cookie is everyone's identity, and OAuth is the stronger one where it exists."""
    if not oauth_enabled():
        return None
    import gradio as gr

    return gr.LoginButton()


def identify(request: Any, signer: Signer, trust_proxy: bool) -> Visitor:
    """The visitor behind a ``gr.Request``: the signed-in Hugging Face account (on a Space with
    OAuth), else the id in the cookie the middleware verified or issued (a request that
    bypassed it gets a fresh one), and the hashed client network.

    Gradio's session hash plays no part: anyone who learns it (it travels in URLs) could
    otherwise become that visitor. A browser that blocks the cookie is a new visitor on
    each request; it can chat, and votes once it allows the cookie or signs in."""
    headers = {k.lower(): v for k, v in dict(getattr(request, "headers", None) or {}).items()}
    client = getattr(request, "client", None)
    peer = getattr(client, "host", None) if client is not None else None
    address = client_address(headers, peer, trust_proxy)
    visitor_id = oauth_visitor_id(signer, _oauth_userinfo(request)) if oauth_enabled() else None
    visitor_id = (
        visitor_id or headers.get(HEADER_ID) or signer.verify(_cookie(headers.get("cookie", ""), COOKIE)) or signer.new_id()
    )
    return Visitor(visitor_id, signer.ip_key(address))

"""The admin token: who may roll back, reset, train now and export with visitor ids.

A token is a password that a browser form sends, so three rules keep it from being
guessed: it must be long (``MIN_TOKEN_CHARS``), it must not be a value printed in our own
docs, and each network gets ``ATTEMPTS_PER_MINUTE`` wrong tries per minute, after which
every try from it is refused, the right token included (so a guesser learns nothing).
Only wrong tries count: an admin clicking through actions is never locked out.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections import deque
from typing import Any

from rlhf_demo.visitors import Signer, Visitor, client_address

log = logging.getLogger(__name__)
MIN_TOKEN_CHARS = 16
ATTEMPTS_PER_MINUTE = 5
# Values that appear in the README or in common examples: never accepted as a token.
EXAMPLE_TOKENS = frozenset({"change-me", "changeme", "admin", "password", "secret", "token", "your-token-here"})
GENERATE_HINT = "generate one with `openssl rand -hex 16`"


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be the admin token, or None when it can (empty: admin is off)."""
    if not token:
        return None
    if token.strip().lower() in EXAMPLE_TOKENS:
        return f"the admin token is an example value from the docs; {GENERATE_HINT}"
    if len(token) < MIN_TOKEN_CHARS:
        return f"the admin token is {len(token)} characters, the minimum is {MIN_TOKEN_CHARS}; {GENERATE_HINT}"
    return None


class AdminRefused(Exception):
    """An admin action refused; the message is safe to show."""


class AdminGate:
    """Checks admin tokens, counting wrong tries per client network."""

    def __init__(self, token: str, signer: Signer, trust_proxy: bool) -> None:
        self.problem = token_problem(token)
        if self.problem:
            log.error("admin actions disabled: %s", self.problem)
        self._token = "" if self.problem else token
        self._signer = signer
        self._trust_proxy = trust_proxy
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self._token)

    def check(self, presented: Any, visitor: Visitor | None = None) -> None:
        """Return when ``presented`` is the token and its network has tries left; else AdminRefused."""
        key = self._key(visitor)
        now = time.monotonic()
        with self._lock:
            recent = self._failures.setdefault(key, deque())
            while recent and now - recent[0] > 60:
                recent.popleft()
            if len(recent) >= ATTEMPTS_PER_MINUTE:
                raise AdminRefused(
                    f"Too many wrong admin tokens: at most {ATTEMPTS_PER_MINUTE} per minute. Please wait a minute."
                )
            # surrogatepass: a token holding a lone surrogate (JSON "\udc80") is just a wrong token
            if (
                self._token
                and isinstance(presented, str)
                and hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), self._token.encode())
            ):
                return
            recent.append(now)
            if len(self._failures) > 100_000:  # a client rotating addresses cannot grow the table without bound
                for stale in [k for k, v in self._failures.items() if not v or now - v[-1] > 60]:
                    del self._failures[stale]
        raise AdminRefused("This action needs the admin token.")

    def _key(self, visitor: Visitor | None) -> str:
        """The caller's network: the visitor's, else that of the Gradio request being served."""
        if visitor is not None and visitor.ip_key:
            return visitor.ip_key
        request = _current_request()
        if request is not None:
            headers = {k.lower(): v for k, v in dict(getattr(request, "headers", None) or {}).items()}
            client = getattr(request, "client", None)
            address = client_address(headers, getattr(client, "host", None) if client is not None else None, self._trust_proxy)
            key = self._signer.ip_key(address)
            if key:
                return key
        return "unknown network"


def _current_request() -> Any:
    """The request Gradio is running an event for (it sets this context for every event), or None."""
    try:
        from gradio.context import LocalContext
    except ImportError:
        return None
    return LocalContext.request.get(None)

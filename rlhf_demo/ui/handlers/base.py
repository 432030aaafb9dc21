"""What every tab's handlers share: the runtime, the vote rate limits, ownership checks and
the one way an answer is recorded."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from rlhf_demo.admin import AdminGate
from rlhf_demo.runtime import Runtime
from rlhf_demo.serving import Generation
from rlhf_demo.ui.handlers.checks import UserError
from rlhf_demo.visitors import Visitor

# A browser that blocks our cookie is a new visitor on each request (identity never comes from
# Gradio's session hash), so its own answers look like someone else's: say what helps.
OWNER_REFUSAL = (
    "That answer was written for another visitor. If it was yours, your browser did not send this site's cookie: "
    "allow it, or open the app in its own tab (or sign in, where offered)."
)


class RateLimiter:
    """At most ``limit`` events per key in any 60 s window (in memory, per process).

    Keys are visitor ids and hashed addresses; idle keys are dropped so that a client
    rotating identities cannot grow the table without bound."""

    def __init__(self, limit: int, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.max_keys = max_keys
        self._events: dict[str, deque[float]] = {}

    def _window(self, key: str, now: float) -> deque[float]:
        window = self._events.setdefault(key, deque())
        while window and now - window[0] > 60:
            window.popleft()
        return window

    def allows(self, key: str) -> bool:
        return len(self._window(key, time.monotonic())) < self.limit

    def record(self, key: str) -> None:
        now = time.monotonic()
        self._window(key, now).append(now)
        if len(self._events) > self.max_keys:
            for stale in [k for k, w in self._events.items() if not w or now - w[-1] > 60]:
                del self._events[stale]


class TabHandlers:
    """One runtime and one pair of vote limiters, shared by every tab of a page."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.limits = runtime.settings.limits
        self.votes = RateLimiter(self.limits.votes_per_minute)  # per visitor
        self.ip_votes = RateLimiter(self.limits.votes_per_minute_per_ip)  # per address
        self.admin = AdminGate(runtime.settings.admin_token, runtime.signer, runtime.settings.trust_proxy)

    def check_vote_rate(self, visitor: Visitor) -> None:
        """Per visitor and per address; nothing counted unless both allow the vote."""
        keys = [(self.votes, f"v:{visitor.id}")]
        if visitor.ip_key:
            keys.append((self.ip_votes, f"ip:{visitor.ip_key}"))
        for limiter, key in keys:
            if not limiter.allows(key):
                raise UserError(f"Too many votes: at most {limiter.limit} per minute. Please wait a moment.")
        for limiter, key in keys:
            limiter.record(key)

    def own_response(self, visitor: Visitor, response_id: str) -> dict[str, Any]:
        row = self.runtime.store.get_response(response_id)
        if row["visitor_id"] != visitor.id:
            raise UserError(OWNER_REFUSAL)
        return row

    def record(self, visitor: Visitor, result: Generation, conversation_id: str | None, parent: str | None = None) -> str:
        """Store one finished answer with its exact prompt; returns its response id."""
        return self.runtime.store.log_response(
            visitor_id=visitor.id,
            prompt=result.prompt,
            text=result.text,
            adapter_version=result.version,
            sampling={
                "temperature": result.sampling.temperature,
                "top_p": result.sampling.top_p,
                "max_new_tokens": result.sampling.max_new_tokens,
            },
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            latency_s=result.latency_s,
            finish_reason=result.finish_reason,
            conversation_id=conversation_id,
            parent_id=parent,
        )

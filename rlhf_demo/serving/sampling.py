"""What a request asks for and what it gets back: clamped sampling settings, the finished answer."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from rlhf_demo.config import SamplingBounds


def strip_control(text: str) -> str:
    """Drop control characters (NUL included) but newlines and tabs: byte-level tokens can
    decode to them, and they have no place in a chat message or the database."""
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters after clamping to the configured hard bounds (temperature 0: greedy)."""

    temperature: float
    top_p: float
    max_new_tokens: int

    @classmethod
    def clamp(
        cls,
        bounds: SamplingBounds,
        temperature: float | None = None,
        top_p: float | None = None,
        max_new_tokens: int | None = None,
    ) -> Sampling:
        t = bounds.temperature if temperature is None else float(temperature)
        p = bounds.top_p if top_p is None else float(top_p)
        n = bounds.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        return cls(
            temperature=min(max(t, bounds.min_temperature), bounds.max_temperature),
            top_p=min(max(p, bounds.min_top_p), 1.0),
            max_new_tokens=min(max(n, 1), bounds.max_max_new_tokens),
        )

    def within(self, bounds: SamplingBounds) -> Sampling:
        """The same settings clamped to ``bounds``: the server never trusts a caller's object."""
        return Sampling.clamp(bounds, self.temperature, self.top_p, self.max_new_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Generation:
    """One finished answer and everything the store records about it."""

    text: str
    version: str
    prompt: list[dict[str, str]]
    sampling: Sampling
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    finish_reason: str  # "stop" (EOS) | "length" | "cancelled"
    token_ids: tuple[int, ...] = ()  # the answer's tokens (no EOS): what rollouts score and train on

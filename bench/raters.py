"""Simulated raters for ``bench/learning.py``: ``rate(prompt, response) -> float``, higher is better.

A rater stands in for the people who vote in the live demo. The benchmark turns its scores
into votes (A/B: the higher-scored answer wins, equal scores are a tie; 👍/👎: above or
below the running median of all scores so far) and, separately, uses it as the judge of
the win-rate of the tuned adapter against the base model on held-out prompts.

Pass one as ``--rater bench.raters:brevity`` (any importable ``module:function`` works).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable

Rater = Callable[[str, str], float]

_WORD = re.compile(r"[A-Za-z0-9']+")


def load_rater(spec: str) -> Rater:
    """``package.module:function`` (e.g. ``bench.raters:brevity``) → the function."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise SystemExit(f"--rater must look like module:function, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def brevity(prompt: str, response: str) -> float:
    """Shorter is better: minus the number of words. An empty answer is no answer, so it
    scores below any real one (-100); otherwise a 3-word answer beats a 30-word one."""
    n = len(response.split())
    return -100.0 if n == 0 else -float(n)


def keyword_rater(word: str, cap: int = 3) -> Rater:
    """A rater that likes answers mentioning ``word`` (whole word, any case): the number
    of mentions, at most ``cap``; answers without it all score 0 (ties)."""
    pattern = re.compile(rf"\b{re.escape(word.lower())}\b")

    def rate(prompt: str, response: str) -> float:
        return float(min(cap, len(pattern.findall(response.lower()))))

    rate.__name__ = f"keyword_{word}"
    return rate


def keyword(prompt: str, response: str) -> float:
    """Mentions of the keyword ``$BENCH_KEYWORD`` (default ``happy``), capped at 3."""
    return keyword_rater(os.environ.get("BENCH_KEYWORD", "happy"))(prompt, response)


ENTHUSIASTIC_WORDS = frozenset(
    "amazing awesome great wonderful fantastic excellent love lovely exciting excited "
    "delighted happy glad fun wow yay brilliant incredible super absolutely".split()
)


def enthusiasm(prompt: str, response: str) -> float:
    """Exclamation marks plus enthusiastic words (``ENTHUSIASTIC_WORDS``), each capped at
    5, so the score cannot grow without bound by shouting one thing over and over."""
    bangs = min(5, response.count("!"))
    cheer = min(5, sum(w in ENTHUSIASTIC_WORDS for w in _words(response)))
    return float(bangs + cheer)


__all__ = ["brevity", "enthusiasm", "keyword", "keyword_rater", "ENTHUSIASTIC_WORDS"]

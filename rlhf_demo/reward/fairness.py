"""One visitor must not dominate the reward model: cap each session's share of the votes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any


def cap_per_session(rows: Sequence[dict[str, Any]], cap: int) -> list[dict[str, Any]]:
    """Keep at most ``cap`` rows per ``session_id`` (the newest; rows come oldest first)."""
    if cap <= 0:
        return list(rows)
    seen: Counter[str] = Counter()
    kept = []
    for row in reversed(rows):
        session = row.get("session_id", "")
        if seen[session] < cap:
            seen[session] += 1
            kept.append(row)
    kept.reverse()
    return kept

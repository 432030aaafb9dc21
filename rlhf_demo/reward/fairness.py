"""One visitor must not dominate the reward model: cap each voter's share of the votes.

A *voter* is counted twice over: by visitor id (``session_id``: the server-issued id) and
by network (``ip_key``: a keyed hash of the address). Dropping the cookie makes a new
visitor but not a new network; a crowd behind one address shares that address's share.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any


def cap_per_session(rows: Sequence[dict[str, Any]], cap: int) -> list[dict[str, Any]]:
    """Keep at most ``cap`` rows per ``session_id`` (the newest; rows come oldest first)."""
    return _keep_newest(rows, lambda row: row.get("session_id", ""), cap)


def _keep_newest(rows: Sequence[dict[str, Any]], key: Any, cap: int) -> list[dict[str, Any]]:
    if cap <= 0:
        return list(rows)
    seen: Counter[Any] = Counter()
    kept = []
    for row in reversed(rows):
        group = key(row)
        if seen[group] < cap:
            seen[group] += 1
            kept.append(row)
    kept.reverse()
    return kept


def share_cap(sizes: Sequence[int], max_share: float) -> int:
    """The largest per-group cap ``k`` with ``k <= max_share * sum(min(n, k))``: capped at
    ``k`` rows, no group holds more than ``max_share`` of what is kept.

    With fewer than ``1 / max_share`` groups that bound cannot hold unless nothing is kept,
    so the share allowed is ``1 / groups`` instead: nobody gets more than an equal share.
    """
    sizes = [n for n in sizes if n > 0]
    if not sizes:
        return 0
    share = max(max_share, 1.0 / len(sizes))
    low, high = 1, max(sizes)  # k = 1 always holds when share >= 1 / groups
    while low < high:  # the condition holds on an interval [1, k*]: binary search its end
        mid = (low + high + 1) // 2
        if mid <= share * sum(min(n, mid) for n in sizes):
            low = mid
        else:
            high = mid - 1
    return low


def cap_per_voter(rows: Sequence[dict[str, Any]], max_share: float, cap: int = 0) -> list[dict[str, Any]]:
    """Keep the newest rows of each visitor and each network so that none holds more than
    ``max_share`` of the rows kept (see :func:`share_cap`), and none more than ``cap``
    rows (0: no absolute cap). Rows without an ``ip_key`` (offline tools) form no network
    group. Repeated until stable, since capping one grouping shrinks the total the other
    was measured against."""
    kept = list(rows)
    groupings = (lambda r: ("v", r.get("session_id", "")), lambda r: ("ip", r.get("ip_key") or ("v", r.get("session_id", ""))))
    for _ in range(20):
        before = len(kept)
        for key in groupings:
            if cap > 0:
                kept = _keep_newest(kept, key, cap)
            if 0 < max_share < 1:
                kept = _keep_newest(kept, key, share_cap(list(Counter(key(r) for r in kept).values()), max_share))
        if len(kept) == before:
            break
    return kept

"""One actor must not dominate the reward model: cap each actor's share of the rows.

An *actor* is every visitor id (``visitor_id``: the server-issued id) and every network
(``ip_key``: a keyed hash of the address) that the votes link: a visitor who votes from two
networks joins them, and a network that two visitors vote from joins those. So dropping the
cookie keeps the network, changing address keeps the cookie, and a chain of both stays one
actor; only a new cookie on a new address with no vote linking them to the old ones looks
like a new person (nothing stored could tell them apart). A crowd behind one address shares
that address's share. Rows without an ``ip_key`` (offline tools) are grouped by visitor.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any


def actor_ids(rows: Sequence[dict[str, Any]]) -> list[int]:
    """The actor of each row (0, 1, ... in order of first appearance): the visitor ids and
    networks its votes link, found with a union-find over (visitor, network) pairs."""
    parent: dict[Hashable, Hashable] = {}

    def root(node: Hashable) -> Hashable:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]  # path halving keeps the trees flat
            node = parent[node]
        return node

    for row in rows:
        visitor = root(("visitor", row.get("visitor_id", "")))
        if row.get("ip_key"):
            parent[root(("network", row["ip_key"]))] = visitor
    labels: dict[Hashable, int] = {}
    return [labels.setdefault(root(("visitor", row.get("visitor_id", ""))), len(labels)) for row in rows]


def share_cap(sizes: Sequence[int], max_share: float) -> int:
    """The number of rows each actor may keep (its newest), one cap ``c`` for all.

    With ``G`` actors holding ``sizes`` rows, each keeps ``min(n, c)``:

    - ``G >= 1 / max_share``: the largest ``c`` with ``c <= max_share * sum(min(n, c))``, so
      no actor holds more than ``max_share`` (10 %) of the rows kept. The right side only
      grows as rows are added, so one more vote never lowers ``c``; and ``c + 1`` would
      break the bound, so nobody is cut further than it requires.
    - fewer actors: the 10 % bound cannot hold, and an equal *fraction* each would cut
      everyone to the smallest voter (five voters with 40 rows and a newcomer with 1 would
      keep 6 rows). The share below ten actors is *equal footing* instead: ``c`` is the
      second largest size, so nobody holds more than another voter does, and a lone voter
      keeps everything. The second largest size only grows as votes are added.

    So one more vote cuts another actor only where the share itself changes: when a second
    actor appears (the first keeps as much as the second) and when the tenth does (the
    10 % bound starts). Two identities that no vote links (a new cookie on a new address)
    are two actors; below ten actors, they are each other's equal.
    """
    ordered = sorted((n for n in sizes if n > 0), reverse=True)
    if not ordered:
        return 0
    if len(ordered) * max_share < 1:
        return ordered[1] if len(ordered) > 1 else ordered[0]
    low, high = 1, ordered[0]  # c = 1 holds: max_share * G >= 1
    while low < high:  # the bound holds on an interval [1, c*] (concave in c): bisect its end
        mid = (low + high + 1) // 2
        if mid <= max_share * sum(min(n, mid) for n in ordered) * (1 + 1e-12):
            low = mid
        else:
            high = mid - 1
    return low


def _keep_newest(rows: Sequence[dict[str, Any]], groupings: Sequence[tuple[Sequence[Hashable], int]]) -> list[dict[str, Any]]:
    """The newest rows (rows come oldest first) such that no label of any grouping keeps more
    than that grouping's cap; order kept."""
    seen: list[Counter[Hashable]] = [Counter() for _ in groupings]
    kept = []
    for i in reversed(range(len(rows))):
        labels = [labels[i] for labels, _ in groupings]
        if all(count[label] < cap for count, label, (_, cap) in zip(seen, labels, groupings, strict=True)):
            for count, label in zip(seen, labels, strict=True):
                count[label] += 1
            kept.append(rows[i])
    kept.reverse()
    return kept


def _limit(sizes: Sequence[int], max_share: float, cap: int) -> int:
    """:func:`share_cap` of ``sizes`` after the absolute ``cap`` (0: none)."""
    if cap > 0:
        sizes = [min(n, cap) for n in sizes]
    return share_cap(sizes, max_share) if 0 < max_share < 1 else max(sizes, default=0)


def cap_per_voter(rows: Sequence[dict[str, Any]], max_share: float, cap: int = 0) -> list[dict[str, Any]]:
    """Keep the newest rows of each visitor id, then of each actor (see :func:`actor_ids`):
    at most ``cap`` rows each (0: no absolute cap), and no more than :func:`share_cap`
    allows for ``max_share`` (ignored unless between 0 and 1).

    Visitor ids are capped first because an actor can be made of many people: one cookie
    voting from networks honest visitors also use joins them all into one actor, which
    alone would have no other actor to be measured against. The actors' cap is then taken
    on what the visitors keep, so the share bound holds for the rows finally kept. Both caps
    come from counts that only grow as votes are added, so neither falls when one is.
    """
    visitors = [row.get("visitor_id", "") for row in rows]
    visitor_sizes = Counter(visitors)
    visitor_cap = _limit(list(visitor_sizes.values()), max_share, cap)
    actors = actor_ids(rows)
    actor_sizes: Counter[int] = Counter()
    for visitor, actor in dict(zip(visitors, actors, strict=True)).items():
        actor_sizes[actor] += min(visitor_sizes[visitor], visitor_cap)
    actor_cap = _limit(list(actor_sizes.values()), max_share, cap)
    return _keep_newest(rows, [(visitors, visitor_cap), (actors, actor_cap)])


def training_votes(store: Any, limits: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The A/B pairs and thumbs the next reward model trains on: each kind capped per voter
    by ``limits`` (``max_training_share``, ``max_training_votes``). The worker trains on
    exactly these; the dashboard counts them."""
    share, cap = limits.max_training_share, limits.max_training_votes
    return cap_per_voter(store.preference_pairs(), share, cap), cap_per_voter(store.thumb_examples(), share, cap)

"""The per-actor cap on the reward model's training rows (rlhf_demo.reward.fairness).

Properties, each a test: adding one honest vote never removes another voter's rows beyond
what that voter's share requires; one actor (any number of visitor ids and addresses the
votes link) holds at most 10 % of the rows once 10 voters exist, and never more than
another voter below that; a new Space with three voters still trains.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from rlhf_demo.reward.fairness import actor_ids, cap_per_voter, share_cap

SHARE = 0.10


def votes(voter: str, n: int, ip: str | None = None) -> list[dict[str, Any]]:
    """``n`` rows from one visitor id on one network (its own unless given)."""
    return [{"visitor_id": voter, "ip_key": ip or f"net-{voter}"} for _ in range(n)]


def kept_per_voter(rows: list[dict[str, Any]]) -> Counter[str]:
    return Counter(r["visitor_id"] for r in cap_per_voter(rows, SHARE))


def test_a_one_row_newcomer_does_not_cut_five_voters_to_one_row_each() -> None:
    five = [row for v in "abcde" for row in votes(v, 40)]
    assert len(cap_per_voter(five, SHARE)) == 200
    assert len(cap_per_voter([*five, *votes("new", 1)], SHARE)) == 201
    space = [row for v in "abcde" for row in votes(v, 28)]  # the reported Space: 140 pairs
    assert len(cap_per_voter([*space, *votes("sixth", 1)], SHARE)) == 141


def test_a_new_space_with_three_voters_trains() -> None:
    three = [*votes("a", 30), *votes("b", 12), *votes("c", 3)]
    assert kept_per_voter(three) == {"a": 12, "b": 12, "c": 3}  # the largest is cut to the next
    assert len(cap_per_voter(votes("alone", 9), SHARE)) == 9  # a first visitor trying the demo


def test_below_ten_voters_no_actor_holds_more_than_another_voter() -> None:
    honest = [*votes("h1", 10), *votes("h2", 8), *votes("h3", 5)]
    loud = votes("loud", 500)
    assert kept_per_voter([*loud, *honest]) == {"loud": 10, "h1": 10, "h2": 8, "h3": 5}
    # a lone voter keeps everything; once a second one votes, nobody holds more than the other
    assert kept_per_voter([*votes("first", 40), *votes("second", 1)]) == {"first": 1, "second": 1}


def test_one_actor_with_many_ids_and_addresses_holds_at_most_ten_percent() -> None:
    """Cookies dropped and addresses changed, but each new cookie first votes from the last
    address (or each address sees the last cookie): the votes link them into one actor."""
    chain = []
    for i in range(150):
        chain += [{"visitor_id": f"cookie-{i}", "ip_key": f"addr-{i}", "attacker": True}]
        chain += [{"visitor_id": f"cookie-{i}", "ip_key": f"addr-{i + 1}", "attacker": True}]
    honest = [row for i in range(20) for row in votes(f"honest-{i}", 6)]
    kept = cap_per_voter(chain + honest, SHARE)
    from_attacker = sum(bool(r.get("attacker")) for r in kept)
    assert 0 < from_attacker <= SHARE * len(kept)
    assert len(kept) - from_attacker == len(honest)  # honest voters keep everything
    assert len(set(actor_ids(chain))) == 1


def test_a_crowd_behind_one_address_is_one_actor_and_offline_rows_group_by_visitor() -> None:
    crowd = [row for i in range(30) for row in votes(f"rotated-{i}", 10, ip="one-address")]
    honest = [row for i in range(20) for row in votes(f"honest-{i}", 4)]
    kept = cap_per_voter(crowd + honest, SHARE)
    assert sum(r["ip_key"] == "one-address" for r in kept) <= SHARE * len(kept)
    offline = [{"visitor_id": s, "ip_key": None} for s, n in (("a", 5), ("b", 5), ("c", 5)) for _ in range(n)]
    assert len(cap_per_voter(offline, SHARE)) == 15


def _space(rng: random.Random) -> list[dict[str, Any]]:
    """1 to 14 visitors: most on a network of their own, some on two, some behind another's."""
    rows: list[dict[str, Any]] = []
    networks: dict[str, list[str]] = {}
    for i in range(rng.randint(1, 14)):
        kind = rng.random()
        if kind < 0.2 and networks:
            networks[f"v{i}"] = [networks[rng.choice(sorted(networks))][0]]  # a crowd behind one address
        else:
            networks[f"v{i}"] = [f"n{i}", f"n{i}b"] if kind < 0.4 else [f"n{i}"]
        rows += [
            {"visitor_id": f"v{i}", "ip_key": rng.choice(networks[f"v{i}"])}
            for _ in range(rng.choice([1, 2, 3, 5, 8, 20, 40, 100]))
        ]
    return rows


def _kept_per_actor(rows: list[dict[str, Any]]) -> tuple[Counter[str], dict[str, str]]:
    """Rows kept per actor, named by its first visitor; and each visitor's actor."""
    actor_of: dict[str, str] = {}
    first: dict[int, str] = {}
    for row, actor in zip(rows, actor_ids(rows), strict=True):
        actor_of[row["visitor_id"]] = first.setdefault(actor, row["visitor_id"])
    return Counter(actor_of[r["visitor_id"]] for r in cap_per_voter(rows, SHARE)), actor_of


@pytest.mark.parametrize("seed", range(60))
def test_adding_one_vote_never_cuts_another_voter_beyond_its_share(seed: int) -> None:
    """One vote more (from a visitor, on one of its networks, or from a newcomer). Another
    actor loses rows only as far as its share requires: from 10 actors on, one more row would
    put it over 10 %; below that, it keeps as much as the next largest actor; and a visitor
    may be cut when the tenth visitor arrives (a crowd behind one address)."""
    rng = random.Random(seed)
    rows = _space(rng)
    voter = rng.choice([*sorted({r["visitor_id"] for r in rows}), "newcomer"])
    network = rng.choice([r["ip_key"] for r in rows if r["visitor_id"] == voter] or ["new network"])
    after_rows = [*rows, {"visitor_id": voter, "ip_key": network}]
    before, _ = _kept_per_actor(rows)
    after, actor_of = _kept_per_actor(after_rows)
    total = sum(after.values())
    tenth_visitor = len({r["visitor_id"] for r in rows}) < 1 / SHARE <= len({r["visitor_id"] for r in after_rows})
    for actor, kept in before.items():
        now = after[actor_of[actor]]
        if actor_of[actor] == actor_of[voter] or now >= kept or tenth_visitor:
            continue
        if len(after) >= 1 / SHARE:
            assert now + 1 > SHARE * (total + 1), f"{actor} was cut below 10 %"
        else:
            assert now >= max(n for a, n in after.items() if a != actor_of[actor]), f"{actor} was cut below the next voter"


def test_the_tenth_voter_is_the_only_cut_and_only_as_far_as_ten_percent_requires() -> None:
    """Nine voters with 40 rows each hold 11 % each once a tenth voter (1 row) exists: the
    10 % bound then needs them cut to 1 row each; one more voter with a few rows relaxes it."""
    nine = [row for i in range(9) for row in votes(f"v{i}", 40)]
    assert len(cap_per_voter(nine, SHARE)) == 360
    assert set(kept_per_voter([*nine, *votes("tenth", 1)]).values()) == {1}
    grown = kept_per_voter([*nine, *votes("tenth", 1), *votes("eleventh", 30)])
    assert grown["v0"] == 31 and grown["v0"] <= SHARE * sum(grown.values()) < grown["v0"] + 1


def test_share_cap_is_the_largest_cap_that_holds() -> None:
    assert share_cap([], SHARE) == 0
    assert share_cap([7], SHARE) == 7
    assert share_cap([100, 4, 4], SHARE) == 4
    assert share_cap([40] * 5 + [1], SHARE) == 40
    many = [1000] + [10] * 19
    cap = share_cap(many, SHARE)
    assert cap <= SHARE * (cap + 190) < cap + 1  # one more row would break the 10 % bound


def test_an_absolute_cap_still_applies_per_actor() -> None:
    rows = [{"visitor_id": "loud", "ip_key": None, "i": i} for i in range(100)] + [
        {"visitor_id": "quiet", "ip_key": None, "i": 100}
    ]
    kept = cap_per_voter(rows, max_share=1.0, cap=10)
    assert sum(r["visitor_id"] == "loud" for r in kept) == 10
    assert [r["i"] for r in kept][-11:] == [*range(90, 100), 100]  # newest kept, order preserved
    assert cap_per_voter(rows, max_share=1.0, cap=0) == rows

"""The arena leaderboard: all versions from all Compare matches, votes and intervals right."""

from __future__ import annotations

import pytest

from rlhf_demo.analytics import leaderboard, matches_from_votes


def votes(a: str, b: str, outcome: str, n: int) -> list[dict[str, str]]:
    return [{"version_a": a, "version_b": b, "outcome": outcome}] * n


def test_the_oldest_version_counts_its_votes_and_has_a_real_interval():
    """Issue 12: v0 played every match yet showed "0 votes, 1000–1000"."""
    matches = matches_from_votes(votes("v1", "v0", "A", 6) + votes("v0", "v1", "A", 3) + votes("v2", "v0", "B", 2))
    rows = {r.version: r for r in leaderboard(matches, rounds=100)}
    assert rows["v0"].votes == 11 and rows["v1"].votes == 9 and rows["v2"].votes == 2
    assert rows["v0"].rating == 1000 and rows["v0"].low < 1000 < rows["v0"].high
    assert rows["v0"].opponents == "v1, v2" and rows["v2"].opponents == "v0"
    assert rows["v0"].win_rate == pytest.approx(5 / 11)
    assert rows["v2"].win_rate == pytest.approx(0.0)
    for r in rows.values():
        assert r.low <= r.rating <= r.high


def test_matches_between_any_two_versions_count_not_only_predecessors():
    """v3 never met v2 (its predecessor) but beat v0 and v1: it ranks first."""
    matches = matches_from_votes(
        votes("v1", "v0", "A", 5)
        + votes("v2", "v1", "A", 5)
        + votes("v3", "v0", "A", 5)
        + votes("v3", "v1", "A", 5)
        + votes("v2", "v0", "tie", 2)
    )
    rows = leaderboard(matches, rounds=50)
    assert [r.version for r in rows] == ["v0", "v1", "v2", "v3"]
    by_version = {r.version: r for r in rows}
    assert by_version["v3"].rank == 1 and by_version["v0"].rank == 4
    assert by_version["v3"].votes == 10 and by_version["v3"].win_rate == 1.0
    assert by_version["v2"].votes == 7 and by_version["v2"].opponents == "v0, v1"
    assert sorted(r.rank for r in rows) == [1, 2, 3, 4]


def test_no_matches_no_rows():
    assert leaderboard([]) == []
    assert matches_from_votes(votes("v0", "v1", "both_bad", 3)) == []

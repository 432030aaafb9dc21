"""The live-loop bench's two figures, read off its report: the first published version and
the first answer the votes' reward model picked, both timed from the vote that starts the
worker's first cycle."""

from __future__ import annotations

import pytest

pytest.importorskip("playwright")

from bench.live_loop import first_change_s, first_pick_s  # noqa: E402


def report(votes: list[tuple[str, int]], runs: list[tuple[str, str]]) -> dict:
    return {
        "trigger_vote_at": "2026-12-04T09:00:00+00:00",
        "votes": [{"answered_at": at, "picked_from": n} for at, n in votes],
        "runs": [{"status": status, "finished_at": at} for status, at in runs],
    }


def test_the_first_change_is_the_first_publish_not_a_rejected_cycle():
    r = report([], [("rejected", "2026-12-04T09:03:00+00:00"), ("succeeded", "2026-12-04T09:07:30+00:00")])
    assert first_change_s(r) == 450.0


def test_the_first_pick_counts_only_picked_answers_after_the_trigger_vote():
    r = report(
        [
            ("2026-12-04T08:59:00+00:00", 4),  # before the trigger: not what the first cycle taught
            ("2026-12-04T09:00:20+00:00", 1),  # a plain sample
            ("2026-12-04T09:00:41.5+00:00", 4),
            ("2026-12-04T09:01:30+00:00", 4),
        ],
        [],
    )
    assert first_pick_s(r) == 41.5
    assert first_change_s(r) is None


def test_no_trigger_vote_no_figures():
    r = report([("2026-12-04T09:00:41+00:00", 4)], [("succeeded", "2026-12-04T09:01:00+00:00")])
    del r["trigger_vote_at"]
    assert first_pick_s(r) is None and first_change_s(r) is None

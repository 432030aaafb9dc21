"""The Dashboard's texts: votes until the next training, clear empty states, the leaderboard."""

from __future__ import annotations

import dataclasses

from rlhf_demo.ui import dashboard

PROMPT = [{"role": "user", "content": "q"}]


def answer(store, version: str = "v0", text: str = "x") -> str:
    return store.log_response(session_id="s", prompt=PROMPT, text=text, adapter_version=version, sampling={}, prompt_tokens=1, completion_tokens=1, latency_s=0.1)


def test_votes_until_the_next_training_count_down(runtime):
    store = runtime.store
    training = dataclasses.replace(runtime.settings.training, min_votes=3, every_votes=2)
    assert dashboard.votes_until_training(store, training) == 3
    assert "**3 more votes until the next training**" in dashboard.training_markdown(store, training)
    for n in range(2):
        store.rate(f"s{n}", answer(store), 1)
    assert dashboard.training_markdown(store, training).startswith("**1 more vote until the next training**")
    store.rate("s9", answer(store), -1)
    assert dashboard.votes_until_training(store, training) == 0
    assert "Enough new votes" in dashboard.training_markdown(store, training)


def test_empty_dashboard_says_so(runtime):
    store = runtime.store
    assert dashboard.leaderboard_rows(store) == []
    assert "No Compare votes between two different versions" in dashboard.leaderboard_note([])
    assert "No training run yet" in dashboard.curves_note(store)
    fig = dashboard.curves_figure(store)
    for ax in fig.axes:
        assert ax.get_yticks().size == 0 and any("no training run yet" in t.get_text() for t in ax.texts)


def test_leaderboard_rows_count_every_match_of_the_oldest_version(runtime):
    store = runtime.store
    for outcome in ("B", "B", "A"):
        store.prefer(session_id="s", response_a_id=answer(store, "v0"), response_b_id=answer(store, "v1"), outcome=outcome, source="two_versions")
    rows = dashboard.leaderboard_rows(store)
    assert dashboard.LEADERBOARD_COLUMNS[5] == "votes" and dashboard.LEADERBOARD_COLUMNS[6] == "rank"
    v0, v1 = rows
    assert (v0[0], v0[5], v0[4], v0[6]) == ("v0", 3, "33%", 2)
    assert (v1[0], v1[5], v1[4], v1[6]) == ("v1", 3, "67%", 1)
    low, high = (int(x) for x in v0[2].split("–"))
    assert low < 1000 < high, "the oldest version's interval is not the anchor's 1000–1000"
    assert dashboard.leaderboard_note(rows) == ""

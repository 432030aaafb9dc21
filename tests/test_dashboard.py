"""The Dashboard's texts: votes until the next training, clear empty states, the leaderboard."""

from __future__ import annotations

import dataclasses

from rlhf_demo.ui import dashboard

PROMPT = [{"role": "user", "content": "q"}]


def answer(store, version: str = "v0", text: str = "x") -> str:
    return store.log_response(
        visitor_id="s",
        prompt=PROMPT,
        text=text,
        adapter_version=version,
        sampling={},
        prompt_tokens=1,
        completion_tokens=1,
        latency_s=0.1,
    )


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
        store.prefer(
            visitor_id="s",
            response_a_id=answer(store, "v0"),
            response_b_id=answer(store, "v1"),
            outcome=outcome,
            source="two_versions",
        )
    rows = dashboard.leaderboard_rows(store)
    assert dashboard.LEADERBOARD_COLUMNS[5] == "votes" and dashboard.LEADERBOARD_COLUMNS[6] == "rank"
    v0, v1 = rows
    assert (v0[0], v0[5], v0[4], v0[6]) == ("v0", 3, "33%", 2)
    assert (v1[0], v1[5], v1[4], v1[6]) == ("v1", 3, "67%", 1)
    low, high = (int(x) for x in v0[2].split("–"))
    assert low < 1000 < high, "the oldest version's interval is not the anchor's 1000–1000"
    assert dashboard.leaderboard_note(rows) == ""


def test_equal_ratings_share_a_rank(runtime):
    store = runtime.store
    for outcome in ("A", "B"):  # one win each: the same rating
        store.prefer(
            visitor_id="s",
            response_a_id=answer(store, "v0"),
            response_b_id=answer(store, "v1"),
            outcome=outcome,
            source="two_versions",
        )
    rows = dashboard.leaderboard_rows(store)
    assert rows[0][1] == rows[1][1] and [r[6] for r in rows] == [1, 1]


def finished_run(store, ppo_steps: int, decision: str = "rejected", reasons: tuple[str, ...] = ()) -> int:
    run = store.start_run("cycle")
    for step in range(1, ppo_steps + 1):
        store.log_metrics(run, "ppo", step, {"score": 0.1 * step, "kl": 0.01 * step})
    store.finish_run(
        run, "succeeded", {"decision": decision, "gate": {"passed": decision == "published", "reasons": list(reasons)}}
    )
    return run


def test_curves_use_whole_run_numbers_and_say_when_a_run_had_no_ppo(runtime):
    store = runtime.store
    finished_run(store, ppo_steps=3)
    last = finished_run(store, ppo_steps=0, reasons=("reward model not trusted yet: too few votes",))
    fig = dashboard.curves_figure(store)
    accuracy, reward, kl = fig.axes
    assert all(float(t).is_integer() for t in accuracy.get_xticks()), accuracy.get_xticks()
    for ax in (reward, kl):
        assert any(f"no PPO in run {last}" in t.get_text() for t in ax.texts)


def test_the_worker_line_says_why_the_last_cycle_ended_as_it_did(runtime):
    store = runtime.store
    finished_run(store, ppo_steps=0, reasons=("reward model not trusted yet: too few votes",))
    line = dashboard.last_cycle_markdown(store)
    assert "rejected" in line and "reward model not trusted yet: too few votes" in line


def test_tables_refresh_when_a_run_starts_or_ends(runtime):
    events = dashboard.DashboardEvents(runtime, None)
    seen = events.runs_seen()
    run = runtime.store.start_run("cycle")
    assert events.runs_seen() != seen
    seen = events.runs_seen()
    runtime.store.finish_run(run, "succeeded", {"decision": "rejected"})
    assert events.runs_seen() != seen


def test_the_counter_says_how_many_votes_count_after_the_per_voter_cap(runtime):
    """One visitor's flood is capped by the worker before training: the dashboard says so."""
    store = runtime.store
    for _ in range(10):
        store.rate("flooder", answer(store), 1)
    store.rate("someone", answer(store), -1)
    text = dashboard.counted_markdown(store, runtime.settings)
    assert "2 of 11" in text and "10%" in text


def test_the_run_and_version_tables_wrap_long_reasons(runtime):
    """A gate's reasons run to a sentence or two: the tables wrap them instead of cutting them off."""
    import gradio as gr

    from rlhf_demo.ui.app import build_app

    demo = build_app(runtime)
    tables = {tuple(b.headers): b for b in demo.blocks.values() if isinstance(b, gr.Dataframe)}
    assert tables[tuple(dashboard.RUN_COLUMNS)].wrap and tables[tuple(dashboard.VERSION_COLUMNS)].wrap

"""Worker building blocks without training: trigger, gate, atomic publish, repair, status, arena."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from conftest import write_random_adapter

from rlhf_demo.analytics import bradley_terry, leaderboard, matches_from_votes
from rlhf_demo.modeling.adapters import AdapterError
from rlhf_demo.store import FeedbackStore
from rlhf_demo.ui import dashboard
from rlhf_demo.worker.gate import GateConfig, evaluate_gate, is_degenerate
from rlhf_demo.worker.loop import due
from rlhf_demo.worker.publish import clean_partial, publish
from rlhf_demo.worker.status import WorkerStatus, read_status, request_training, take_training_request, write_status

PROMPT = [{"role": "user", "content": "hi"}]


def add_votes(store: FeedbackStore, n: int, session: str = "s") -> None:
    for i in range(n):
        rid = store.log_response(
            visitor_id=session,
            prompt=[{"role": "user", "content": f"q{i}"}],
            text=f"a{i}",
            adapter_version="v0",
            sampling={},
            prompt_tokens=1,
            completion_tokens=1,
            latency_s=0.1,
        )
        store.rate(session, rid, 1 if i % 2 else -1)


# ----- trigger -----------------------------------------------------------------------
def test_due_needs_minimum_votes_then_every_n(settings, tmp_path):
    settings = dataclasses.replace(
        settings, training=dataclasses.replace(settings.training, min_votes=4, every_votes=3, every_minutes=60)
    )
    store = FeedbackStore(tmp_path / "f.db")
    assert due(store, settings) is None
    assert due(store, settings, manual=True) is None  # nothing at all to learn from
    add_votes(store, 3)
    assert due(store, settings) is None
    assert "manual" in due(store, settings, manual=True)
    add_votes(store, 1)
    assert "new votes" in due(store, settings)
    run = store.start_run("cycle")
    store.finish_run(run, "succeeded")
    assert due(store, settings) is None
    add_votes(store, 1, session="t")
    assert due(store, settings) is None  # 1 new vote < every_votes, and not 60 min yet
    later = datetime.now(UTC) + timedelta(minutes=61)
    assert "min since" in due(store, settings, now=later)


# ----- gate --------------------------------------------------------------------------
def test_gate_decisions():
    cfg = GateConfig(min_improvement=0.1, max_kl=5.0)
    texts = ["a fine answer", "another one", "a third", "and a fourth"]
    good = evaluate_gate([1.0, 1.2, 0.9, 1.1], [0.5, 0.6, 0.4, 0.5], [1.0, 2.0, 1.0, 1.0], texts, cfg)
    assert good.passed and not good.reasons and good.lower_bound > 0.1 and good.units == 4
    worse = evaluate_gate([0.5, 0.6, 0.5, 0.4], [0.55, 0.5, 0.6, 0.5], [1.0] * 4, texts, cfg)
    assert not worse.passed and "not better" in worse.reasons[0]
    far = evaluate_gate([2.0, 2.1, 2.0, 2.2], [0.0] * 4, [9.0] * 4, texts, cfg)
    assert not far.passed and "KL" in far.reasons[0]
    loops = evaluate_gate([2.0, 2.0, 2.1, 2.0], [0.0] * 4, [1.0] * 4, ["", "the cat " * 30, "", "fine"], cfg)
    assert not loops.passed and "degenerate" in loops.reasons[0]
    assert not evaluate_gate([], [], [], [], cfg).passed
    single = evaluate_gate([9.0], [0.0], [0.0], ["ok"], cfg)  # one pair says nothing about its noise
    assert not single.passed and "not better" in single.reasons[0]


def test_gate_needs_a_gain_beyond_its_noise_paired_by_prompt():
    """A mean gain that one lucky prompt makes is not enough; the same gain on every prompt is."""
    cfg = GateConfig(min_improvement=0.0, confidence=0.8)
    texts = ["an answer"] * 12
    lucky = evaluate_gate([6.0] + [-0.4] * 5 + [0.0] * 6, [0.0] * 12, [1.0] * 12, texts, cfg, group_size=2)
    assert lucky.improvement > 0 and lucky.units == 6 and not lucky.passed
    steady = evaluate_gate(
        [0.3, 0.5, 0.2, 0.4, 0.5, 0.7, 0.3, 0.3, 0.4, 0.6, 0.2, 0.5], [0.0] * 12, [1.0] * 12, texts, cfg, group_size=2
    )
    assert steady.passed and 0.0 < steady.lower_bound <= steady.improvement
    # paired: a prompt that is hard for both sides does not hide the gain
    hard = evaluate_gate([0.5, -2.5] * 6, [0.2, -2.8] * 6, [1.0] * 12, texts, cfg, group_size=1)
    assert hard.passed and hard.improvement == pytest.approx(0.3)


def test_degenerate_detection():
    assert is_degenerate("   ", 0.3)
    assert is_degenerate("go go go go go go go go go go go go go go", 0.3)
    assert not is_degenerate("Paris is the capital of France and its largest city by far.", 0.3)


# ----- publish / repair ----------------------------------------------------------------
def test_publish_is_atomic_and_registry_row_last(runtime, tiny_loaded, settings):
    store = runtime.store
    write_random_adapter(tiny_loaded, settings, "v7", seed=7)  # a folder nobody registered
    model = tiny_loaded.model
    from rlhf_demo.modeling.adapters import attach_new_adapter

    attach_new_adapter(model, "policy", settings.lora)
    version = publish(store, model, "policy", settings.adapters_dir, "v0", {"gate": {"passed": True}})
    assert version == "v1" and store.active_version() == "v1"
    assert (settings.adapters_dir / "v1" / "adapter_model.safetensors").is_file()
    assert not list(settings.adapters_dir.glob(".*"))
    assert runtime.sync_registry() == "v1"  # the server picks it up from the registry
    removed = clean_partial(settings.adapters_dir, store)
    assert removed == ["v7"]  # unregistered leftovers go, published ones stay
    assert (settings.adapters_dir / "v1").is_dir() and (settings.adapters_dir / "v0").is_dir()


def test_publish_of_a_broken_adapter_changes_nothing(runtime, tiny_loaded, settings, monkeypatch):
    from rlhf_demo.modeling.adapters import attach_new_adapter
    from rlhf_demo.worker import publish as publish_module

    attach_new_adapter(tiny_loaded.model, "policy", settings.lora)

    def broken(*_args, **_kwargs):
        raise AdapterError("does not load back")

    monkeypatch.setattr(publish_module, "verify_loads", broken)
    with pytest.raises(AdapterError):
        publish(runtime.store, tiny_loaded.model, "policy", settings.adapters_dir, "v0", {})
    assert runtime.store.active_version() == "v0"
    assert [v["version"] for v in runtime.store.list_versions()] == ["v0"]
    clean_partial(settings.adapters_dir, runtime.store)
    assert sorted(p.name for p in settings.adapters_dir.iterdir()) == ["v0"]


def test_corrupt_published_adapter_is_refused_by_the_server(runtime, settings):
    folder = settings.adapters_dir / "v1"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{not json")
    (folder / "adapter_model.safetensors").write_bytes(b"junk")
    runtime.store.register_version("v1", str(folder), "v0", "active", {})
    assert runtime.sync_registry() == "v0"
    assert "refused v1" in runtime.status.last_error


# ----- status ------------------------------------------------------------------------
def test_status_file_round_trip_and_train_now(tmp_path):
    status = WorkerStatus(state="training", phase="ppo", step=2, total=4, started_at=1.0)
    write_status(tmp_path, status)
    back = read_status(tmp_path)
    assert back is not None and (back.phase, back.step, back.total) == ("ppo", 2, 4)
    assert "2/4" in dashboard.status_markdown(back, "running")
    (tmp_path / "status.json").write_text("{half")
    assert read_status(tmp_path) is None
    assert not take_training_request(tmp_path)
    request_training(tmp_path)
    assert take_training_request(tmp_path) and not take_training_request(tmp_path)


# ----- arena -------------------------------------------------------------------------
def test_bradley_terry_orders_versions_and_win_rates():
    votes = [{"version_a": "v1", "version_b": "v0", "outcome": "A"}] * 8 + [
        {"version_a": "v0", "version_b": "v1", "outcome": "A"}
    ] * 2
    votes += [
        {"version_a": "v0", "version_b": "v1", "outcome": "tie"},
        {"version_a": "v0", "version_b": "v1", "outcome": "both_bad"},
    ]
    matches = matches_from_votes(votes)
    assert len(matches) == 11  # both-bad is no match
    ratings = bradley_terry(matches)
    assert ratings["v0"] == 1000 and ratings["v1"] > 1100
    rows = leaderboard(matches, rounds=50)
    v1 = next(r for r in rows if r.version == "v1")
    assert v1.opponents == "v0" and v1.votes == 11
    assert v1.win_rate == pytest.approx(8.5 / 11)
    assert v1.low <= v1.rating <= v1.high


def test_dashboard_tables_from_store(runtime):
    store = runtime.store
    a = store.log_response(
        visitor_id="s",
        prompt=PROMPT,
        text="x",
        adapter_version="v0",
        sampling={},
        prompt_tokens=1,
        completion_tokens=1,
        latency_s=0.1,
    )
    b = store.log_response(
        visitor_id="s",
        prompt=PROMPT,
        text="y",
        adapter_version="v1",
        sampling={},
        prompt_tokens=1,
        completion_tokens=1,
        latency_s=0.1,
    )
    store.prefer(visitor_id="s", response_a_id=a, response_b_id=b, outcome="B", source="two_versions")
    assert store.version_votes() == [{"version_a": "v0", "version_b": "v1", "outcome": "B"}]
    rows = dashboard.leaderboard_rows(store)
    assert [r[0] for r in rows] == ["v0", "v1"] and rows[1][4] == "100%"
    assert dashboard.versions_rows(store)[0][:4][0] == "v0"
    fig = dashboard.curves_figure(store)
    assert len(fig.axes) == 3


def test_dashboard_shows_gate_reasons_and_the_confidence_bound(runtime):
    store = runtime.store
    texts = ["an answer"] * 6
    gate = evaluate_gate([0.1, 0.0, 0.2, 0.1, 0.0, 0.1], [0.2, 0.3, 0.1, 0.2, 0.3, 0.2], [1.0] * 6, texts, GateConfig())
    run = store.start_run("cycle")
    store.finish_run(run, "rejected", summary={"decision": "rejected", "gate": gate.as_metrics()})
    row = dashboard.run_rows(store)[0]
    assert row[3] == "rejected" and row[4].startswith("reward not better with 80% confidence") and "[" not in row[4]
    assert "gain ≥" in dashboard.gate_summary(gate.as_metrics()) and "6 prompts" in dashboard.gate_summary(gate.as_metrics())


# ----- Spaces persistence ------------------------------------------------------------------
def test_snapshot_of_a_live_database_is_consistent(tmp_path):
    import sqlite3

    from rlhf_demo.hub_sync import hub_target, persistence_note, snapshot_database

    store = FeedbackStore(tmp_path / "live.db")
    add_votes(store, 5)
    copy = snapshot_database(tmp_path / "live.db", tmp_path / "snap" / "feedback.db")
    con = sqlite3.connect(copy)
    assert con.execute("select count(*) from ratings").fetchone()[0] == 5
    con.close()
    assert FeedbackStore(copy).counts()["thumbs_down"] == 3
    assert hub_target({"HF_TOKEN": "x"}) is None
    assert hub_target({"HF_TOKEN": "x", "RLHF_DEMO_HUB_DATASET": "me/votes"}) == ("me/votes", "x")
    assert "wiped on restart" in persistence_note(copy, {"SPACE_ID": "me/space"})
    assert "me/votes" in persistence_note(copy, {"HF_TOKEN": "x", "RLHF_DEMO_HUB_DATASET": "me/votes"})


def test_dashboard_says_when_a_candidate_was_trained_on_from_an_unproven_one(runtime):
    store = runtime.store
    folder = runtime.settings.adapters_dir / "v0"
    store.register_version("v1", folder, "v0", "rejected", {"gate": {"improvement": 0.02}, "trained_from": "v0"})
    store.register_version("v2", folder, "v0", "rejected", {"gate": {"improvement": 0.03}, "trained_from": "v1"})
    rows = {row[0]: row for row in dashboard.versions_rows(store)}
    assert rows["v2"][4].startswith("trained on from v1") and "trained on" not in rows["v1"][4]


def test_the_gate_gives_few_held_out_prompts_more_answers():
    """At 10-20 votes the store holds 3-4 held-out prompts: 4 answers each gave the gate 12-16
    paired units, and it rejected candidates that the reward model found better (gain +0.075,
    bound -0.002). Fewer prompts get more answers each, up to the answers that a full set of
    prompts would get (at most 4x the setting); a full set is unchanged."""
    config = GateConfig(prompts=16, samples_per_prompt=4)
    assert config.answers_per_prompt(16) == 4 and config.answers_per_prompt(20) == 4
    assert config.answers_per_prompt(8) == 8 and config.answers_per_prompt(5) == 13
    assert config.answers_per_prompt(4) == 16 and config.answers_per_prompt(1) == 16
    assert GateConfig(prompts=2, samples_per_prompt=2).answers_per_prompt(2) == 2

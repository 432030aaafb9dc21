"""Tests for rlhf_demo.store, training runs and their metrics."""

from __future__ import annotations

import pytest

from rlhf_demo.store import FeedbackStore, InvalidInputError, UnknownIdError
from tests import store_fixtures

db_path = store_fixtures.db_path  # the fixture, usable in this module
store = store_fixtures.store  # the fixture, usable in this module


def test_runs_metrics_and_stale_runs(store: FeedbackStore) -> None:
    done = store.start_run("reward+ppo")
    store.log_metric(done, "reward", 0, "loss", 0.69)
    store.log_metrics(done, "ppo", 1, {"kl": 0.01, "reward": 1.5, "nan": float("nan")})
    store.finish_run(done, "succeeded", summary={"acc": 0.7}, candidate_version="v1")
    with pytest.raises(InvalidInputError):
        store.finish_run(done, "failed")
    with pytest.raises(InvalidInputError):
        store.log_metric(done, "warmup", 0, "loss", 1.0)
    with pytest.raises(UnknownIdError):
        store.log_metric(999, "ppo", 0, "loss", 1.0)

    metrics = store.run_metrics(done)
    assert [(m["phase"], m["step"], m["name"], m["value"]) for m in metrics] == [
        ("reward", 0, "loss", 0.69),
        ("ppo", 1, "kl", 0.01),
        ("ppo", 1, "reward", 1.5),
        ("ppo", 1, "nan", None),
    ]
    stale = store.start_run("reward")
    assert store.mark_stale_runs_failed() == 1
    assert store.mark_stale_runs_failed() == 0
    runs = store.list_runs()
    assert [r["id"] for r in runs] == [stale, done]
    assert (runs[0]["status"], runs[0]["error"]) == ("failed", "interrupted")
    assert runs[1]["summary"] == {"acc": 0.7} and runs[1]["candidate_version"] == "v1"
    assert len(store.list_runs(limit=1)) == 1

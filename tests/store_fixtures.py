"""Fixtures and helpers shared by the tests of rlhf_demo.store (tests/test_store_*.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from rlhf_demo.store import FeedbackStore

PROMPT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
]
OTHER_PROMPT = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "feedback.db"


@pytest.fixture
def store(db_path: Path):
    with FeedbackStore(db_path) as opened:
        yield opened


def respond(
    store: FeedbackStore,
    text: str = "Blue.",
    visitor_id: str = "s1",
    prompt: list[dict[str, str]] = PROMPT,
    **extra,
) -> str:
    return store.log_response(
        visitor_id=visitor_id,
        prompt=prompt,
        text=text,
        adapter_version="v0",
        sampling={"temperature": 0.7, "top_p": 0.9},
        prompt_tokens=12,
        completion_tokens=2,
        latency_s=0.25,
        **extra,
    )


def table_counts(path: Path) -> dict[str, int]:
    """Row counts read through a separate connection: proves what was committed."""
    with sqlite3.connect(path) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {n: conn.execute(f'SELECT COUNT(*) FROM "{n}"').fetchone()[0] for n in names}


@pytest.fixture
def voted_store(store: FeedbackStore) -> FeedbackStore:
    a, b = respond(store, "Blue."), respond(store, "No.")
    c, d = (
        respond(store, "Apple.", prompt=OTHER_PROMPT),
        respond(store, "?", prompt=OTHER_PROMPT),
    )
    store.prefer(
        visitor_id="s1",
        response_a_id=a,
        response_b_id=b,
        outcome="A",
        source="two_samples",
    )
    store.prefer(
        visitor_id="s2",
        response_a_id=c,
        response_b_id=d,
        outcome="B",
        source="two_versions",
    )
    store.prefer(
        visitor_id="s4",
        response_a_id=c,
        response_b_id=d,
        outcome="tie",
        source="two_samples",
    )
    store.prefer(
        visitor_id="s3",
        response_a_id=a,
        response_b_id=b,
        outcome="both_bad",
        source="two_samples",
    )
    store.rate("s1", a, 1)
    return store

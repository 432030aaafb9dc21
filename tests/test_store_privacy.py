"""Tests for rlhf_demo.store, "delete my data"."""

from __future__ import annotations

from pathlib import Path

from rlhf_demo.store import FeedbackStore
from tests import store_fixtures
from tests.store_fixtures import respond, table_counts

db_path = store_fixtures.db_path  # the fixture, usable in this module
store = store_fixtures.store  # the fixture, usable in this module


def test_delete_session_data(store: FeedbackStore, db_path: Path) -> None:
    conversation = store.new_conversation("gone")
    a = respond(store, session_id="gone", conversation_id=conversation)
    b = respond(store, "Red.", session_id="gone", conversation_id=conversation)
    kept = respond(store, session_id="stays")
    store.rate("gone", a, 1)
    store.rate("stays", a, -1)  # a vote on a deleted response goes with it
    store.rate("stays", kept, 1)
    store.prefer(
        session_id="gone",
        response_a_id=a,
        response_b_id=b,
        outcome="A",
        source="two_samples",
    )

    deleted = store.delete_session_data("gone")
    assert deleted == {
        "preferences": 1,
        "ratings": 2,
        "responses": 2,
        "conversations": 1,
    }
    counts = table_counts(db_path)
    assert (counts["responses"], counts["ratings"], counts["conversations"]) == (
        1,
        1,
        0,
    )
    assert store.delete_session_data("gone") == dict.fromkeys(deleted, 0)


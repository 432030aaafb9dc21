"""Tests for rlhf_demo.store, "delete my data"."""

from __future__ import annotations

from pathlib import Path

from rlhf_demo.store import FeedbackStore
from tests import store_fixtures
from tests.store_fixtures import respond, table_counts

db_path = store_fixtures.db_path  # the fixture, usable in this module
store = store_fixtures.store  # the fixture, usable in this module


def test_delete_visitor_data(store: FeedbackStore, db_path: Path) -> None:
    conversation = store.new_conversation("gone")
    a = respond(store, visitor_id="gone", conversation_id=conversation)
    b = respond(store, "Red.", visitor_id="gone", conversation_id=conversation)
    kept = respond(store, visitor_id="stays")
    store.rate("gone", a, 1)
    store.rate("stays", a, -1)  # a vote on a deleted response goes with it
    store.rate("stays", kept, 1)
    store.prefer(
        visitor_id="gone",
        response_a_id=a,
        response_b_id=b,
        outcome="A",
        source="two_samples",
    )

    deleted = store.delete_visitor_data("gone")
    assert deleted == {
        "preferences": 1,
        "ratings": 2,
        "responses": 2,
        "conversations": 1,
        "run summaries": 0,
    }
    counts = table_counts(db_path)
    assert (counts["responses"], counts["ratings"], counts["conversations"]) == (
        1,
        1,
        0,
    )
    assert store.delete_visitor_data("gone") == dict.fromkeys(deleted, 0)


def test_delete_reaches_run_summaries_and_leaves_no_copy_in_the_file(store: FeedbackStore, db_path: Path) -> None:
    """Run summaries keep a few gate samples (a visitor's prompt and the candidate's answer):
    they go with the visitor's data, other visitors' samples stay, and no byte of the
    deleted text is left in the database file or its write-ahead log."""
    mine = [{"role": "user", "content": "My secret recipe is saffron?"}]
    theirs = [{"role": "user", "content": "Name a tree."}]
    respond(store, "Secret answer about saffron.", visitor_id="gone", prompt=mine)
    respond(store, "Oak.", visitor_id="stays", prompt=theirs)
    samples = [
        {"prompt": "My secret recipe is saffron?", "answer": "Candidate text on saffron."},
        {"prompt": "Name a tree.", "answer": "Birch."},
    ]
    run = store.start_run("cycle")
    store.finish_run(
        run, "succeeded", summary={"gate": {"passed": True}, "samples": samples, "echo": "Secret answer about saffron."}
    )
    other = store.start_run("cycle")
    store.finish_run(other, "rejected", summary={"samples": samples[1:]})

    deleted = store.delete_visitor_data("gone")

    assert deleted["run summaries"] == 1
    runs = {r["id"]: r["summary"] for r in store.list_runs()}
    assert runs == {run: {"gate": {"passed": True}, "samples": samples[1:]}, other: {"samples": samples[1:]}}
    for path in (db_path, db_path.with_name(db_path.name + "-wal")):  # while the store is open
        data = path.read_bytes() if path.exists() else b""
        assert b"saffron" not in data, f"deleted text left in {path.name}"

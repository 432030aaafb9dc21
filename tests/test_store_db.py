"""Tests for rlhf_demo.store, plumbing: migrations, locking, threads, reads beside a held write."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from rlhf_demo.store import LATEST_VERSION, FeedbackStore, StoreBusyError, StoreError, migrate, schema_version
from tests import store_fixtures
from tests.store_fixtures import OTHER_PROMPT, PROMPT, respond, table_counts

db_path = store_fixtures.db_path  # the fixture, usable in this module
store = store_fixtures.store  # the fixture, usable in this module


def old_response(rid: str, prompt: list, **extra: str) -> dict:
    """A ``responses`` row as files before schema 7 held it (the voter under ``session_id``)."""
    row = {"id": rid, "session_id": "old", "prompt_json": json.dumps(prompt), "text": rid, "adapter_version": "v0"}
    row |= {"sampling_json": "{}", "prompt_tokens": 1, "completion_tokens": 1, "latency_s": 0.1, "finish_reason": "stop"}
    return row | {"created_at": "2024-01-01T00:00:00.000000+00:00"} | extra


def test_migration_from_v1_keeps_data(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db = sqlite_utils.Database(db_path)
    assert migrate(db, target=1) == 1
    db.table("responses").insert(
        {
            "id": "r1",
            "session_id": "old",
            "prompt_json": json.dumps(PROMPT),
            "text": "Green.",
            "adapter_version": "v0",
            "sampling_json": "{}",
            "prompt_tokens": 3,
            "completion_tokens": 1,
            "latency_s": 0.1,
            "finish_reason": "stop",
            "created_at": "2024-01-01T00:00:00.000000+00:00",
        }
    )
    assert "idx_ratings_response_id" not in {i.name for i in db.table("ratings").indexes}
    db.close()

    with FeedbackStore(db_path) as store:
        assert schema_version(store.db) == LATEST_VERSION
        assert "idx_ratings_response_id" in {i.name for i in store.db.table("ratings").indexes}
        assert store.get_response("r1")["text"] == "Green."
        store.rate("old", "r1", 1)
    with FeedbackStore(db_path) as again:  # opening an up-to-date file changes nothing
        assert again.counts()["thumbs_up"] == 1


def test_migration_to_v3_keeps_the_newest_of_duplicate_pair_votes(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db = sqlite_utils.Database(db_path)
    migrate(db, target=2)
    for rid in ("ra", "rb"):
        db.table("responses").insert(old_response(rid, OTHER_PROMPT))
    for i, (a, b, outcome) in enumerate([("ra", "rb", "A"), ("rb", "ra", "A"), ("ra", "rb", "B")]):
        db.table("preferences").insert(
            {
                "id": f"p{i}",
                "session_id": "old",
                "prompt_json": json.dumps(OTHER_PROMPT),
                "response_a_id": a,
                "response_b_id": b,
                "outcome": outcome,
                "source": "two_samples",
                "created_at": f"2024-01-01T00:00:0{i}.000000+00:00",
            }
        )
    db.close()
    with FeedbackStore(db_path) as store:
        (pair,) = store.preference_pairs()
        assert (pair["chosen"], pair["rejected"]) == ("rb", "ra")  # the newest vote, p2
        assert store.count_votes_since(None) == 1


def test_newer_schema_is_refused(db_path: Path) -> None:
    FeedbackStore(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    with pytest.raises(StoreError, match="newer"):
        FeedbackStore(db_path)


def test_store_does_not_import_heavy_libraries() -> None:
    code = "import sys, rlhf_demo.store; print([m for m in ('torch', 'gradio', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_locked_database_raises_busy_and_writes_nothing(store: FeedbackStore, db_path: Path) -> None:
    response_id = respond(store)
    locker = sqlite3.connect(db_path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with FeedbackStore(db_path, busy_timeout_ms=100) as impatient:
            with pytest.raises(StoreBusyError, match="nothing was written"):
                impatient.rate("s1", response_id, 1)
            locker.execute("ROLLBACK")
            assert table_counts(db_path)["ratings"] == 0
            impatient.rate("s1", response_id, 1)  # the retry succeeds
    finally:
        locker.close()
    assert store.counts()["thumbs_up"] == 1


def test_threads_share_one_store(store: FeedbackStore) -> None:
    response_id = respond(store)
    errors: list[StoreError] = []

    def vote(worker: int) -> None:
        try:
            for i in range(20):
                store.rate(f"t{worker}-{i}", response_id, 1 if i % 2 else -1)
        except StoreError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=vote, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.counts()["thumbs_up"] + store.counts()["thumbs_down"] == 120


def test_a_held_write_lock_does_not_block_reads(store: FeedbackStore, db_path: Path) -> None:
    """A writer holding the store's lock (and SQLite's write lock) for a long time must
    not make the read-only tabs wait: readers use their own WAL connections."""
    response_id = respond(store)
    store.rate("s1", response_id, 1)
    holding, release = threading.Event(), threading.Event()

    def slow_writer() -> None:
        with store._write() as db:  # the same lock every store write takes
            db.execute("UPDATE ratings SET value = -1")
            holding.set()
            release.wait(30)

    writer = threading.Thread(target=slow_writer)
    writer.start()
    assert holding.wait(10)
    try:
        result: dict[str, Any] = {}
        reader = threading.Thread(target=lambda: result.update(store.counts()))
        reader.start()
        reader.join(10)
        done = not reader.is_alive()
        versions = store.list_versions()  # on this thread too
    finally:
        release.set()
        writer.join()
    assert done, "a read waited for the writer"
    assert result["thumbs_up"] == 1  # the last committed state, not the writer's
    assert versions == []
    assert store.counts()["thumbs_down"] == 1


def test_read_connections_cannot_write(store: FeedbackStore) -> None:
    with pytest.raises(StoreError):
        store._query("DELETE FROM ratings")


def test_migration_5_drops_what_nothing_writes_and_keeps_servable_versions(db_path: Path) -> None:
    """Old files may hold the ``messages`` table and the statuses ``published`` (served) and
    ``candidate`` (never gated): the table goes, a published version stays servable, a
    candidate is never served."""
    db_path.parent.mkdir(parents=True)
    db = sqlite_utils.Database(db_path)
    migrate(db, target=4)
    for version, status in (("v0", "active"), ("v1", "published"), ("v2", "candidate")):
        db.table("adapter_versions").insert(
            {"version": version, "path": f"/a/{version}", "status": status, "metrics_json": "{}", "created_at": "2024"}
        )
    db.close()
    with FeedbackStore(db_path) as store:
        assert "messages" not in store.db.table_names()
        assert [v["status"] for v in store.list_versions()] == ["active", "retired", "rejected"]
        assert store.mark_broken("v0", "gone") == "v1"


def test_migration_7_renames_session_id_to_visitor_id_and_keeps_rows(db_path: Path) -> None:
    """A file at schema 6 holds the voter's identity in ``session_id`` columns; after the
    upgrade the same rows answer under ``visitor_id``, its indexes still enforce one vote
    per visitor, and no index or column is left under the old name."""
    db_path.parent.mkdir(parents=True)
    db = sqlite_utils.Database(db_path)
    migrate(db, target=6)
    db.table("conversations").insert({"id": "c1", "session_id": "old", "created_at": "2024"})
    for rid in ("ra", "rb"):
        db.table("responses").insert(old_response(rid, PROMPT, conversation_id="c1"))
    db.table("ratings").insert({"session_id": "old", "response_id": "ra", "value": 1, "created_at": "2024", "updated_at": "2024"})
    db.table("preferences").insert(
        {
            "id": "p1",
            "session_id": "old",
            "prompt_json": json.dumps(PROMPT),
            "response_a_id": "ra",
            "response_b_id": "rb",
            "outcome": "A",
            "source": "two_samples",
            "created_at": "2024",
            "updated_at": "2024",
        }
    )
    db.close()

    with FeedbackStore(db_path) as store:
        assert schema_version(store.db) == LATEST_VERSION
        for table in ("conversations", "responses", "ratings", "preferences"):
            columns = store.db.table(table).columns_dict
            assert "visitor_id" in columns and "session_id" not in columns, table
            assert [r["visitor_id"] for r in store.db.table(table).rows] == ["old"] * store.db.table(table).count
        index_sql = " ".join(r["name"] + " " + (r["sql"] or "") for r in store.db.query("SELECT name, sql FROM sqlite_master"))
        assert "session_id" not in index_sql
        assert store.rate("old", "ra", -1).change == "updated"  # the same visitor's thumb, not a second row
        assert store.db.table("ratings").count == 1
        (pair,) = store.preference_pairs()
        assert pair["visitor_id"] == "old"
        assert store.delete_visitor_data("old")["responses"] == 2

"""Tests for rlhf_demo.store, votes: thumbs, A/B votes, one vote per pair, reasons."""

from __future__ import annotations

import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from rlhf_demo.store import FeedbackStore, InvalidInputError, StoreError, UnknownIdError
from tests import store_fixtures
from tests.store_fixtures import OTHER_PROMPT, respond, table_counts

db_path = store_fixtures.db_path  # the fixture, usable in this module
store = store_fixtures.store  # the fixture, usable in this module
voted_store = store_fixtures.voted_store  # the fixture, usable in this module


def test_rate_change_and_remove(store: FeedbackStore, db_path: Path) -> None:
    response_id = respond(store)
    store.rate("s1", response_id, 1)
    assert (store.counts()["thumbs_up"], store.counts()["thumbs_down"]) == (1, 0)
    store.rate("s1", response_id, -1)  # a second thumb changes the first
    assert (store.counts()["thumbs_up"], store.counts()["thumbs_down"]) == (0, 1)
    assert table_counts(db_path)["ratings"] == 1
    store.rate("s2", response_id, 1)  # another visitor has its own vote
    assert table_counts(db_path)["ratings"] == 2
    store.rate("s1", response_id, None)
    store.rate("s1", response_id, None)  # removing twice is fine
    assert store.counts() | {"responses": 0} == {
        "responses": 0,
        "thumbs_up": 1,
        "thumbs_down": 0,
        "preferences": 0,
        "ties": 0,
        "both_bad": 0,
        "visitors": 1,
    }


@pytest.mark.parametrize("value", [0, 2, -2, True, False, "1", 1.0])
def test_rate_rejects_invalid_values(store: FeedbackStore, db_path: Path, value: object) -> None:
    response_id = respond(store)
    with pytest.raises(InvalidInputError):
        store.rate("s1", response_id, value)  # type: ignore[arg-type]
    assert table_counts(db_path)["ratings"] == 0


def test_rate_rejects_empty_visitor(store: FeedbackStore) -> None:
    response_id = respond(store)
    for visitor in ["", "   ", None]:
        with pytest.raises(InvalidInputError):
            store.rate(visitor, response_id, 1)  # type: ignore[arg-type]


def test_vote_on_unknown_response_writes_nothing(store: FeedbackStore, db_path: Path) -> None:
    known = respond(store)
    before = table_counts(db_path)
    with pytest.raises(UnknownIdError):
        store.rate("s1", "0" * 32, 1)
    with pytest.raises(UnknownIdError):
        store.prefer(
            visitor_id="s1",
            response_a_id=known,
            response_b_id="missing",
            outcome="A",
            source="two_samples",
        )
    assert table_counts(db_path) == before


def test_prefer_validation(store: FeedbackStore, db_path: Path) -> None:
    a, b = respond(store), respond(store, "Red.")
    other = respond(store, prompt=OTHER_PROMPT)
    ok = {
        "visitor_id": "s1",
        "response_a_id": a,
        "response_b_id": b,
        "outcome": "A",
        "source": "two_samples",
    }
    for bad in [
        {"outcome": "C"},
        {"outcome": "a"},
        {"source": "vibes"},
        {"response_b_id": a},
        {"response_b_id": other},  # answers another prompt
        {"visitor_id": ""},
    ]:
        with pytest.raises(InvalidInputError):
            store.prefer(**{**ok, **bad})
    assert table_counts(db_path)["preferences"] == 0
    assert len(store.prefer(**ok)) == 32


def test_same_pair_race_stores_one_row_per_visitor(db_path: Path) -> None:
    """Four votes per visitor on one pair fired at once, from threads and from separate
    connections (as two processes would): the database keeps exactly one each."""
    with FeedbackStore(db_path) as first:
        pairs = [(respond(first, "Blue."), respond(first, "Red.")) for _ in range(5)]
    stores = [FeedbackStore(db_path) for _ in range(2)]
    barrier = threading.Barrier(16)
    errors: list[Exception] = []

    def vote(i: int) -> None:
        store = stores[i % 2]
        barrier.wait()
        try:
            for a, b in pairs:
                first_a = i % 4 < 2
                store.record_preference(
                    visitor_id=f"visitor-{i // 8}",
                    response_a_id=a if first_a else b,
                    response_b_id=b if first_a else a,
                    outcome="A" if i % 3 else "B",
                    source="two_samples",
                )
        except StoreError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=vote, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for store in stores:
        store.close()
    assert errors == []
    with sqlite3.connect(db_path) as conn:
        per = conn.execute(
            "SELECT visitor_id, min(response_a_id, response_b_id), COUNT(*) FROM preferences GROUP BY 1, 2"
        ).fetchall()
    assert len(per) == 2 * len(pairs)
    assert {n for *_, n in per} == {1}


def test_unique_pair_vote_is_enforced_by_the_database(store: FeedbackStore, db_path: Path) -> None:
    a, b = respond(store), respond(store, "Red.")
    store.prefer(visitor_id="s1", response_a_id=a, response_b_id=b, outcome="A", source="two_samples")
    with sqlite3.connect(db_path) as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute(
            "INSERT INTO preferences (id, visitor_id, prompt_json, response_a_id, response_b_id, "
            "outcome, source, created_at, updated_at) "
            "SELECT 'x', visitor_id, prompt_json, response_b_id, response_a_id, 'B', source, "
            "created_at, updated_at FROM preferences"
        )


def test_changing_a_vote_is_an_update_and_reported(store: FeedbackStore, db_path: Path) -> None:
    a, b = respond(store), respond(store, "Red.")
    vote = {"visitor_id": "s1", "source": "two_samples"}
    first = store.record_preference(**vote, response_a_id=a, response_b_id=b, outcome="A")
    assert first.change == "created"
    assert store.record_preference(**vote, response_a_id=a, response_b_id=b, outcome="A").change == "unchanged"
    changed = store.record_preference(**vote, response_a_id=b, response_b_id=a, outcome="A")
    assert (changed.change, changed.id) == ("updated", first.id)
    assert table_counts(db_path)["preferences"] == 1
    (pair,) = store.preference_pairs()
    assert pair["chosen"] == "Red."  # A is now the second answer
    assert store.rate("s1", a, 1).change == "created"
    assert store.rate("s1", a, 1).change == "unchanged"
    assert store.rate("s1", a, -1).change == "updated"
    assert store.rate("s1", a, None).change == "removed"
    assert store.rate("s1", a, None).change == "absent"


@pytest.mark.parametrize(
    "tags, comment, message",
    [
        (["great"], "", "unknown reason 'great'"),
        (["wrong", 5], "", "unknown reason 5"),
        ("wrong", "", "reasons must be a list"),
        (["wrong"] * 6, "", "at most 5 reasons"),
        ([], "x" * 501, "over the limit of 500"),
        ([], "a\x00b", "NUL"),
        ([], 42, "comment must be a string"),
    ],
)
def test_bad_reasons_are_refused_with_a_clear_message(voted_store: FeedbackStore, tags: Any, comment: Any, message: str) -> None:
    a, b = voted_store.db.execute("SELECT response_a_id, response_b_id FROM preferences WHERE visitor_id = 's1'").fetchone()
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        voted_store.annotate_preference("s1", a, b, tags, comment)
    assert voted_store.db.execute("SELECT reasons, comment FROM preferences WHERE visitor_id = 's1'").fetchone() == (None, None)


def test_reasons_need_the_voters_own_thumbs_down_or_pair_vote(voted_store: FeedbackStore) -> None:
    a, b = voted_store.db.execute("SELECT response_a_id, response_b_id FROM preferences WHERE visitor_id = 's1'").fetchone()
    with pytest.raises(InvalidInputError, match="vote 👎 on this answer first"):
        voted_store.annotate_rating("s1", a, ["wrong"], "")  # s1's thumb on it is a 👍
    with pytest.raises(InvalidInputError, match="vote 👎 on this answer first"):
        voted_store.annotate_rating("nobody", a, ["wrong"], "")
    with pytest.raises(InvalidInputError, match="vote on this pair first"):
        voted_store.annotate_preference("nobody", a, b, ["wrong"], "")

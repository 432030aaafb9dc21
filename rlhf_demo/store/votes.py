"""Votes: 👍/👎 on one answer, A/B votes on a pair, their reasons, and the vote counts.

One vote per (voter, answer) and per (voter, unordered pair) is a UNIQUE index, so a race
of identical votes stores one row; voting again updates it and says so.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from .db import StoreBase, get_row, inserted_id
from .errors import InvalidInputError
from .schema import PAIR_KEY_SQL
from .validate import (
    MAX_ID_BYTES,
    OUTCOMES,
    SOURCES,
    check_choice,
    check_key,
    check_reasons,
    check_str,
    normalize_ts,
    shown,
    utc_now,
)


@dataclass(frozen=True)
class VoteResult:
    """What a vote did: ``created`` a row, ``updated`` the voter's earlier vote on the same
    answer or pair, left it ``unchanged``, ``removed`` it, or found nothing to remove
    (``absent``). ``id`` is the row's id (None when there is no row)."""

    change: str
    id: str | None = None


def pair_vote(db: sqlite_utils.Database, visitor_id: str, a: object, b: object) -> dict[str, Any] | None:
    """This voter's vote on the pair {a, b} (in either order), or None."""
    rows = list(
        db.query(
            "SELECT id, response_a_id, outcome FROM preferences "
            f"WHERE visitor_id = ? AND ({PAIR_KEY_SQL}) = (min(?, ?), max(?, ?))",
            [visitor_id, a, b, a, b],
        )
    )
    return rows[0] if rows else None


def same_questions(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Whether two answers' prompts ask the same questions: read from the last turn back, the
    turns both still hold match, except the assistant's (each side of a continued Compare pair
    goes on from its own answers). One may hold fewer: the oldest turns are dropped to fit the
    model's prompt budget, and longer answers on one side drop more."""
    return bool(a and b) and all(
        x["role"] == y["role"] and (x["role"] == "assistant" or x["content"] == y["content"])
        for x, y in zip(reversed(a), reversed(b), strict=False)  # the turns both hold
    )


def annotate(db: sqlite_utils.Database, table: str, vote_id: Any, tags: list[str], text: str) -> VoteResult:
    """Store checked reasons on one vote row; NULLs when both are empty."""
    values = {"reasons": json.dumps(tags) if tags else None, "comment": text or None}
    db.table(table).update(vote_id, values)
    return VoteResult("updated" if tags or text else "removed", str(vote_id))


def _check_rating(value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value not in (1, -1)):
        raise InvalidInputError(f"a rating must be 1 (thumbs up), -1 (thumbs down) or None; got {shown(value)}")


class Votes(StoreBase):
    """Thumbs, A/B preferences, reasons on them, and dashboard counts."""

    def rate(self, visitor_id: str, response_id: str, value: int | None, ip_key: str | None = None) -> VoteResult:
        """Thumbs up (1) or down (-1); voting again changes it; None removes it."""
        check_str("visitor_id", visitor_id, MAX_ID_BYTES)
        if ip_key is not None:
            check_str("ip_key", ip_key, MAX_ID_BYTES)
        _check_rating(value)
        with self._write() as db:
            get_row(db, "responses", response_id, "response")
            ratings = db.table("ratings")
            existing = list(ratings.rows_where("visitor_id = ? AND response_id = ?", [visitor_id, response_id], limit=1))
            now = utc_now()
            if value is None:
                if not existing:
                    return VoteResult("absent")
                ratings.delete(existing[0]["id"])
                return VoteResult("removed", str(existing[0]["id"]))
            if existing:
                if existing[0]["value"] == value:
                    return VoteResult("unchanged", str(existing[0]["id"]))
                # the reasons explained the old vote: a changed vote drops them
                ratings.update(
                    existing[0]["id"],
                    {"value": value, "updated_at": now, "ip_key": ip_key, "reasons": None, "comment": None},
                )
                return VoteResult("updated", str(existing[0]["id"]))
            row = {"visitor_id": visitor_id, "response_id": response_id, "value": value, "ip_key": ip_key}
            table = ratings.insert({**row, "created_at": now, "updated_at": now})
            return VoteResult("created", str(inserted_id(table)))

    def prefer(self, **vote: Any) -> str:
        """:meth:`record_preference` (same keyword arguments), returning the preference id."""
        result = self.record_preference(**vote)
        assert result.id is not None
        return result.id

    def record_preference(
        self,
        *,
        visitor_id: str,
        response_a_id: str,
        response_b_id: str,
        outcome: str,
        source: str,
        ip_key: str | None = None,
    ) -> VoteResult:
        """An A/B vote; a voter has one vote per pair (in either order), so voting
        again on the same pair updates it. Both answers must answer the same questions
        (:func:`same_questions`); the vote keeps A's prompt."""
        check_str("visitor_id", visitor_id, MAX_ID_BYTES)
        check_choice("outcome", outcome, OUTCOMES)
        check_choice("source", source, SOURCES)
        if ip_key is not None:
            check_str("ip_key", ip_key, MAX_ID_BYTES)
        if response_a_id == response_b_id:
            raise InvalidInputError("a preference needs two different responses")
        vote = {
            "response_a_id": response_a_id,
            "response_b_id": response_b_id,
            "outcome": outcome,
            "source": source,
            "ip_key": ip_key,
        }
        with self._write() as db:
            a = get_row(db, "responses", response_a_id, "response A")
            b = get_row(db, "responses", response_b_id, "response B")
            if not same_questions(json.loads(a["prompt_json"]), json.loads(b["prompt_json"])):
                raise InvalidInputError("responses A and B answer different prompts")
            old = pair_vote(db, visitor_id, response_a_id, response_b_id)
            now = utc_now()
            if old is not None:
                if old["response_a_id"] == response_a_id and old["outcome"] == outcome:
                    return VoteResult("unchanged", old["id"])
                # the reasons explained the old vote: a changed vote drops them
                db.table("preferences").update(old["id"], {**vote, "updated_at": now, "reasons": None, "comment": None})
                return VoteResult("updated", old["id"])
            preference_id = uuid.uuid4().hex
            db.table("preferences").insert(
                {
                    "id": preference_id,
                    "visitor_id": visitor_id,
                    "prompt_json": a["prompt_json"],
                    **vote,
                    "created_at": now,
                    "updated_at": now,
                }
            )
        return VoteResult("created", preference_id)

    def annotate_rating(self, visitor_id: str, response_id: str, reasons: Any, comment: Any) -> VoteResult:
        """Reason tags and a comment on this voter's 👎 of a response (empty ones clear
        them); only a 👎 takes reasons, and only the voter's own."""
        check_str("visitor_id", visitor_id, MAX_ID_BYTES)
        tags, text = check_reasons(reasons, comment)
        key = check_key("response", response_id)
        with self._write() as db:
            rows = list(db.table("ratings").rows_where("visitor_id = ? AND response_id = ?", [visitor_id, key], limit=1))
            if not rows or rows[0]["value"] != -1:
                raise InvalidInputError("reasons go with a 👎 vote: vote 👎 on this answer first")
            return annotate(db, "ratings", rows[0]["id"], tags, text)

    def annotate_preference(
        self, visitor_id: str, response_a_id: str, response_b_id: str, reasons: Any, comment: Any
    ) -> VoteResult:
        """Reason tags and a comment on this voter's A/B vote on a pair (empty ones clear them)."""
        check_str("visitor_id", visitor_id, MAX_ID_BYTES)
        tags, text = check_reasons(reasons, comment)
        a, b = check_key("response A", response_a_id), check_key("response B", response_b_id)
        with self._write() as db:
            vote = pair_vote(db, visitor_id, a, b)
            if vote is None:
                raise InvalidInputError("reasons go with a vote: vote on this pair first")
            return annotate(db, "preferences", vote["id"], tags, text)

    def counts(self) -> dict[str, int]:
        """Dashboard totals; ``preferences`` counts decisive (A or B) votes only."""
        (row,) = self._query(
            """
            SELECT
              (SELECT COUNT(*) FROM responses) AS responses,
              (SELECT COUNT(*) FROM ratings WHERE value = 1) AS thumbs_up,
              (SELECT COUNT(*) FROM ratings WHERE value = -1) AS thumbs_down,
              (SELECT COUNT(*) FROM preferences
                WHERE outcome IN ('A', 'B')) AS preferences,
              (SELECT COUNT(*) FROM preferences WHERE outcome = 'tie') AS ties,
              (SELECT COUNT(*) FROM preferences WHERE outcome = 'both_bad') AS both_bad,
              (SELECT COUNT(*) FROM (SELECT visitor_id FROM ratings
                                     UNION SELECT visitor_id FROM preferences)
              ) AS visitors
            """
        )
        return {key: int(value) for key, value in row.items()}

    def votes_per_visitor(self) -> list[int]:
        """How many votes each visitor gave, largest first; no identities."""
        rows = self._query(
            """
            SELECT COUNT(*) AS n FROM (SELECT visitor_id FROM ratings
                                       UNION ALL SELECT visitor_id FROM preferences)
            GROUP BY visitor_id ORDER BY n DESC
            """
        )
        return [int(row["n"]) for row in rows]

    def count_votes_since(self, iso_ts: str | None) -> int:
        """Votes newer than ``iso_ts`` (all when None): the worker's "enough new data?".

        A vote counts by ``updated_at``, so a changed vote is new feedback too.
        """
        since = "" if iso_ts is None else normalize_ts(iso_ts)
        (row,) = self._query(
            """
            SELECT (SELECT COUNT(*) FROM ratings WHERE updated_at > ?)
                 + (SELECT COUNT(*) FROM preferences WHERE updated_at > ?) AS n
            """,
            [since, since],
        )
        return int(row["n"])

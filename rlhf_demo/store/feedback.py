"""FeedbackStore: every read and write of votes, responses, adapters and runs.

One SQLite file in WAL mode, shared by the serving process (Gradio handlers in many
threads) and the worker process. Each write is one ``BEGIN IMMEDIATE`` transaction,
committed before the method returns, so a vote the UI confirmed is on disk; a write
that fails leaves nothing behind. Inputs are validated before any SQL runs.

Reads go through per-thread read-only connections, never through the writer's lock:
in WAL mode a reader sees the last committed state while a writer works, so the Data
and Dashboard tabs do not wait behind a slow write (or the worker's).

The ``session_id`` arguments and columns hold the *voter's identity*: the server-issued
visitor id in the app (see :mod:`rlhf_demo.visitors`), a fixed name in offline tools.
"""

from __future__ import annotations

import json
import numbers
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import sqlite_utils
from sqlite_utils.db import NotFoundError

from .errors import (
    InvalidInputError,
    StoreError,
    UnknownIdError,
    translate_sqlite_error,
)
from .schema import PAIR_KEY_SQL, immediate_transaction, migrate
from .validate import (
    FINISHED_RUN_STATUSES,
    MAX_ID_BYTES,
    MAX_TEXT_BYTES,
    OUTCOMES,
    PHASES,
    ROLES,
    SERVABLE_STATUSES,
    SOURCES,
    VERSION_STATUSES,
    check_choice,
    check_count,
    check_key,
    check_reasons,
    check_seconds,
    check_str,
    check_version,
    encode_json,
    encode_prompt,
    is_finite_number,
    kind_of,
    normalize_ts,
    shown,
    utc_now,
)


def _decode(row: dict[str, Any], *fields: str) -> dict[str, Any]:
    """Turn ``x_json`` columns back into Python values under the key ``x``."""
    out = dict(row)
    for field in fields:
        raw = out.pop(f"{field}_json")
        out[field] = None if raw is None else json.loads(raw)
    return out


def _reasons(row: dict[str, Any]) -> dict[str, Any]:
    """A vote's reason tags (a list, empty when none) and comment ("" when none)."""
    return {"reasons": json.loads(row["reasons"]) if row["reasons"] else [], "comment": row["comment"] or ""}


def _inserted_id(table: sqlite_utils.db.Table) -> int:
    """The integer id of the row just inserted (INTEGER PRIMARY KEY is the rowid)."""
    if table.last_rowid is None:  # pragma: no cover - sqlite always reports one
        raise StoreError(f"insert into {table.name} reported no row id")
    return table.last_rowid


def _file_id(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` names now (device, inode); None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class VoteResult:
    """What a vote did: ``created`` a row, ``updated`` the voter's earlier vote on the same
    answer or pair, left it ``unchanged``, ``removed`` it, or found nothing to remove
    (``absent``). ``id`` is the row's id (None when there is no row)."""

    change: str
    id: str | None = None


class FeedbackStore:
    """The only door to the SQLite file; safe to share between threads."""

    def __init__(self, db_path: str | Path, busy_timeout_ms: int = 5000) -> None:
        busy_timeout_ms = check_count("busy_timeout_ms", busy_timeout_ms)
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_ms = busy_timeout_ms
        # One connection for all threads, guarded by one lock: sqlite3 connections keep
        # transaction state per connection, so interleaved threads would share it.
        self._lock = threading.RLock()
        self._readers = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        conn = sqlite3.connect(
            str(self.path), timeout=busy_timeout_ms / 1000, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self.db = sqlite_utils.Database(conn)
            migrate(self.db)
            self._file_id = _file_id(self.path)
        except sqlite3.Error as exc:
            conn.close()
            raise translate_sqlite_error(exc, busy_timeout_ms) from exc
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self._closed = True
        with self._readers_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
        with self._lock:
            self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite_utils.Database]:
        """One committed transaction; an error rolls it back, becomes a StoreError."""
        with self._lock:
            self._check_file()
            try:
                with immediate_transaction(self.db):
                    yield self.db
            except sqlite3.Error as exc:
                raise translate_sqlite_error(exc, self._busy_timeout_ms) from exc

    def _check_file(self) -> None:
        """Refuse to write when the file at ``path`` is no longer the one this store opened:
        SQLite would keep writing into the deleted file, and every vote would be lost."""
        now = _file_id(self.path)
        if now != self._file_id:
            how = "deleted" if now is None else "replaced"
            raise StoreError(f"the feedback database {self.path} was {how} while the app ran; nothing was written: restart the app")

    def _reader(self) -> sqlite_utils.Database:
        """This thread's read-only connection (opened on first use).

        Separate connections let readers run beside the writer (WAL); read-only ones
        cannot write by mistake. Each thread has its own, so no lock is needed.
        """
        if self._closed:
            raise StoreError("the feedback store is closed")
        db = getattr(self._readers, "db", None)
        if db is None:
            conn = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=self._busy_timeout_ms / 1000,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            with self._readers_lock:
                self._reader_conns.append(conn)
            db = self._readers.db = sqlite_utils.Database(conn)
        return db

    @contextmanager
    def _read(self) -> Iterator[sqlite_utils.Database]:
        try:
            yield self._reader()
        except sqlite3.Error as exc:
            raise translate_sqlite_error(exc, self._busy_timeout_ms) from exc

    def _query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        with self._read() as db:
            return list(db.query(sql, params or []))

    @staticmethod
    def _get(
        db: sqlite_utils.Database, table: str, key: object, what: str
    ) -> dict[str, Any]:
        key = check_key(what, key)  # SQLite could not bind a huge int or a lone surrogate
        try:
            return db.table(table).get(key)
        except NotFoundError:
            raise UnknownIdError(f"unknown {what}: {shown(key)}") from None

    # -- chat history -------------------------------------------------------------

    def new_conversation(self, session_id: str) -> str:
        check_str("session_id", session_id, MAX_ID_BYTES)
        conversation_id = uuid.uuid4().hex
        with self._write() as db:
            db.table("conversations").insert(
                {
                    "id": conversation_id,
                    "session_id": session_id,
                    "created_at": utc_now(),
                }
            )
        return conversation_id

    def add_message(self, conversation_id: str, role: str, content: str) -> int:
        check_choice("role", role, ROLES)
        check_str("content", content, MAX_TEXT_BYTES, allow_empty=True)
        with self._write() as db:
            self._get(db, "conversations", conversation_id, "conversation")
            table = db.table("messages").insert(
                {
                    "conversation_id": conversation_id,
                    "role": role,
                    "content": content,
                    "created_at": utc_now(),
                }
            )
            return _inserted_id(table)

    # -- responses and votes -----------------------------------------------------

    def log_response(
        self,
        *,
        session_id: str,
        prompt: list[dict[str, str]],
        text: str,
        adapter_version: str,
        sampling: dict[str, Any],
        prompt_tokens: int,
        completion_tokens: int,
        latency_s: float,
        finish_reason: str = "stop",
        conversation_id: str | None = None,
        parent_id: str | None = None,
    ) -> str:
        """Record what the model was shown and what it said; votes point at this id.

        ``parent_id`` names the recorded answer this prompt continues. Then every turn
        of ``prompt`` but the last (a user turn) must be one the server recorded in that
        chain for the same voter: a history forged by a client cannot be stored as one.
        """
        prompt_json = encode_prompt(prompt)
        if parent_id is not None:
            check_str("parent_id", parent_id, MAX_ID_BYTES)
            if prompt[-1]["role"] != "user":
                raise InvalidInputError("a continued conversation must end with a user turn")
        row = {
            "id": uuid.uuid4().hex,
            "session_id": check_str("session_id", session_id, MAX_ID_BYTES),
            "conversation_id": conversation_id,
            "parent_id": parent_id,
            "prompt_json": prompt_json,
            "text": check_str("text", text, MAX_TEXT_BYTES, allow_empty=True),
            "adapter_version": check_str(
                "adapter_version", adapter_version, MAX_ID_BYTES
            ),
            "sampling_json": encode_json("sampling", sampling, finite=True),
            "prompt_tokens": check_count("prompt_tokens", prompt_tokens),
            "completion_tokens": check_count("completion_tokens", completion_tokens),
            "latency_s": check_seconds("latency_s", latency_s),
            "finish_reason": check_str("finish_reason", finish_reason, MAX_ID_BYTES),
            "created_at": utc_now(),
        }
        with self._write() as db:
            if conversation_id is not None:
                conversation = self._get(db, "conversations", conversation_id, "conversation")
                if conversation["session_id"] != session_id:
                    raise InvalidInputError("that conversation belongs to another visitor")
            if parent_id is not None:
                recorded = self._recorded_turns(db, parent_id, session_id)
                forged = [m for m in prompt[:-1] if (m["role"], m["content"]) not in recorded]
                if forged:
                    raise InvalidInputError(
                        f"the conversation holds {len(forged)} turn(s) the server never "
                        "recorded for this visitor; start a new chat"
                    )
            db.table("responses").insert(row)
        return str(row["id"])

    def _recorded_turns(
        self, db: sqlite_utils.Database, response_id: str, session_id: str
    ) -> set[tuple[str, str]]:
        """Every (role, content) the server recorded along a chain of answers.

        The chain is followed through ``parent_id`` (bounded: a conversation has a turn
        limit, a cycle in hand-edited data must not hang).
        """
        turns: set[tuple[str, str]] = set()
        current: str | None = response_id
        for _ in range(1000):
            if current is None:
                break
            row = self._get(db, "responses", current, "parent response")
            if row["session_id"] != session_id:
                raise InvalidInputError("that conversation belongs to another visitor")
            turns.add(("assistant", row["text"]))
            turns.update((m["role"], m["content"]) for m in json.loads(row["prompt_json"]))
            current = row.get("parent_id")
        return turns

    def get_response(self, response_id: str) -> dict[str, Any]:
        """The response row with ``prompt`` and ``sampling`` decoded from JSON."""
        with self._read() as db:
            row = self._get(db, "responses", response_id, "response")
        return _decode(row, "prompt", "sampling")

    def rate(
        self,
        session_id: str,
        response_id: str,
        value: int | None,
        ip_key: str | None = None,
    ) -> VoteResult:
        """Thumbs up (1) or down (-1); voting again changes it; None removes it.

        One rating per (voter, response) is a UNIQUE index, so two concurrent thumbs
        store one row; the result says whether this call created, updated or removed it.
        """
        check_str("session_id", session_id, MAX_ID_BYTES)
        if ip_key is not None:
            check_str("ip_key", ip_key, MAX_ID_BYTES)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value not in (1, -1)
        ):
            raise InvalidInputError(
                "a rating must be 1 (thumbs up), -1 (thumbs down) or None; "
                f"got {shown(value)}"
            )
        with self._write() as db:
            self._get(db, "responses", response_id, "response")
            ratings = db.table("ratings")
            existing = list(
                ratings.rows_where(
                    "session_id = ? AND response_id = ?",
                    [session_id, response_id],
                    limit=1,
                )
            )
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
            table = ratings.insert(
                {
                    "session_id": session_id,
                    "response_id": response_id,
                    "value": value,
                    "ip_key": ip_key,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            return VoteResult("created", str(_inserted_id(table)))

    def prefer(self, **vote: Any) -> str:
        """:meth:`record_preference` (same keyword arguments), returning the preference id."""
        result = self.record_preference(**vote)
        assert result.id is not None
        return result.id

    def record_preference(
        self,
        *,
        session_id: str,
        response_a_id: str,
        response_b_id: str,
        outcome: str,
        source: str,
        ip_key: str | None = None,
    ) -> VoteResult:
        """An A/B vote; a voter has one vote per pair (in either order), so voting
        again on the same pair updates it. The database enforces this with a UNIQUE
        index: a race of identical votes cannot store two rows."""
        check_str("session_id", session_id, MAX_ID_BYTES)
        check_choice("outcome", outcome, OUTCOMES)
        check_choice("source", source, SOURCES)
        if ip_key is not None:
            check_str("ip_key", ip_key, MAX_ID_BYTES)
        if response_a_id == response_b_id:
            raise InvalidInputError("a preference needs two different responses")
        with self._write() as db:
            a = self._get(db, "responses", response_a_id, "response A")
            b = self._get(db, "responses", response_b_id, "response B")
            if a["prompt_json"] != b["prompt_json"]:
                raise InvalidInputError("responses A and B answer different prompts")
            existing = list(
                db.query(
                    f"SELECT id, response_a_id, outcome FROM preferences "
                    f"WHERE session_id = ? AND ({PAIR_KEY_SQL}) = (min(?, ?), max(?, ?))",
                    [session_id, response_a_id, response_b_id, response_a_id, response_b_id],
                )
            )
            now = utc_now()
            if existing:
                old = existing[0]
                if old["response_a_id"] == response_a_id and old["outcome"] == outcome:
                    return VoteResult("unchanged", old["id"])
                db.table("preferences").update(
                    old["id"],
                    {
                        "response_a_id": response_a_id,
                        "response_b_id": response_b_id,
                        "outcome": outcome,
                        "source": source,
                        "ip_key": ip_key,
                        "updated_at": now,
                        "reasons": None,  # they explained the old vote
                        "comment": None,
                    },
                )
                return VoteResult("updated", old["id"])
            preference_id = uuid.uuid4().hex
            db.table("preferences").insert(
                {
                    "id": preference_id,
                    "session_id": session_id,
                    "ip_key": ip_key,
                    "prompt_json": a["prompt_json"],
                    "response_a_id": response_a_id,
                    "response_b_id": response_b_id,
                    "outcome": outcome,
                    "source": source,
                    "created_at": now,
                    "updated_at": now,
                }
            )
        return VoteResult("created", preference_id)

    def annotate_rating(self, session_id: str, response_id: str, reasons: Any, comment: Any) -> VoteResult:
        """Reason tags and a comment on this voter's 👎 of a response (empty ones clear
        them); only a 👎 takes reasons, and only the voter's own."""
        check_str("session_id", session_id, MAX_ID_BYTES)
        tags, text = check_reasons(reasons, comment)
        with self._write() as db:
            rows = list(db.table("ratings").rows_where("session_id = ? AND response_id = ?", [session_id, check_key("response", response_id)], limit=1))
            if not rows or rows[0]["value"] != -1:
                raise InvalidInputError("reasons go with a 👎 vote: vote 👎 on this answer first")
            return self._annotate(db, "ratings", rows[0]["id"], tags, text)

    def annotate_preference(self, session_id: str, response_a_id: str, response_b_id: str, reasons: Any, comment: Any) -> VoteResult:
        """Reason tags and a comment on this voter's A/B vote on a pair (empty ones clear them)."""
        check_str("session_id", session_id, MAX_ID_BYTES)
        tags, text = check_reasons(reasons, comment)
        a, b = check_key("response A", response_a_id), check_key("response B", response_b_id)
        with self._write() as db:
            rows = list(
                db.query(
                    f"SELECT id FROM preferences WHERE session_id = ? AND ({PAIR_KEY_SQL}) = (min(?, ?), max(?, ?))",
                    [session_id, a, b, a, b],
                )
            )
            if not rows:
                raise InvalidInputError("reasons go with a vote: vote on this pair first")
            return self._annotate(db, "preferences", rows[0]["id"], tags, text)

    @staticmethod
    def _annotate(db: sqlite_utils.Database, table: str, vote_id: Any, tags: list[str], text: str) -> VoteResult:
        """Store checked reasons on one vote row; NULLs when both are empty."""
        values = {"reasons": json.dumps(tags) if tags else None, "comment": text or None}
        db.table(table).update(vote_id, values)
        return VoteResult("updated" if tags or text else "removed", str(vote_id))

    # -- dashboard numbers -------------------------------------------------------

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
              (SELECT COUNT(*) FROM (SELECT session_id FROM ratings
                                     UNION SELECT session_id FROM preferences)
              ) AS sessions
            """
        )
        return {key: int(value) for key, value in row.items()}

    def votes_per_session(self) -> list[int]:
        """How many votes each voting session gave, largest first; no identities."""
        rows = self._query(
            """
            SELECT COUNT(*) AS n FROM (SELECT session_id FROM ratings
                                       UNION ALL SELECT session_id FROM preferences)
            GROUP BY session_id ORDER BY n DESC
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

    # -- training data -------------------------------------------------------------

    def preference_pairs(self) -> list[dict[str, Any]]:
        """Decisive A/B votes as prompt/chosen/rejected, oldest first (no ties); with
        ``chosen_finished``/``rejected_finished``: False for an answer cut at the length limit."""
        rows = self._query(
            """
            SELECT p.prompt_json, p.outcome, p.session_id, p.ip_key, p.reasons, p.comment,
                   a.text AS a_text, b.text AS b_text,
                   a.finish_reason NOT IN ('length', 'cancelled') AS a_ended, b.finish_reason NOT IN ('length', 'cancelled') AS b_ended
            FROM preferences p
            JOIN responses a ON a.id = p.response_a_id
            JOIN responses b ON b.id = p.response_b_id
            WHERE p.outcome IN ('A', 'B')
            ORDER BY p.updated_at, p.rowid
            """
        )
        return [
            {
                "prompt": json.loads(row["prompt_json"]),
                "chosen": row["a_text"] if row["outcome"] == "A" else row["b_text"],
                "rejected": row["b_text"] if row["outcome"] == "A" else row["a_text"],
                "chosen_finished": bool(row["a_ended"] if row["outcome"] == "A" else row["b_ended"]),
                "rejected_finished": bool(row["b_ended"] if row["outcome"] == "A" else row["a_ended"]),
                "session_id": row["session_id"],
                "ip_key": row["ip_key"],
                **_reasons(row),
            }
            for row in rows
        ]

    def version_votes(self) -> list[dict[str, Any]]:
        """Compare-tab votes between two different versions: the arena's match list.

        Each row: ``version_a``, ``version_b``, ``outcome`` (A / B / tie / both_bad),
        oldest first; no session ids.
        """
        return self._query(
            """
            SELECT a.adapter_version AS version_a, b.adapter_version AS version_b, p.outcome
            FROM preferences p
            JOIN responses a ON a.id = p.response_a_id
            JOIN responses b ON b.id = p.response_b_id
            WHERE a.adapter_version != b.adapter_version
            ORDER BY p.created_at, p.rowid
            """
        )

    def thumb_examples(self) -> list[dict[str, Any]]:
        """Thumbs as prompt/completion/label (+ ``finished``: False for an answer cut at the
        length limit); a both-bad vote gives two bad examples."""
        rows = self._query(
            """
            SELECT r.updated_at AS t, r.rowid AS k, r.session_id, r.ip_key, x.prompt_json,
                   x.text, x.finish_reason NOT IN ('length', 'cancelled') AS ended, r.value = 1 AS label,
                   r.reasons, r.comment
            FROM ratings r JOIN responses x ON x.id = r.response_id
            UNION ALL
            SELECT p.updated_at, 2 * p.rowid, p.session_id, p.ip_key, x.prompt_json, x.text,
                   x.finish_reason NOT IN ('length', 'cancelled'), 0, p.reasons, p.comment
            FROM preferences p JOIN responses x ON x.id = p.response_a_id
            WHERE p.outcome = 'both_bad'
            UNION ALL
            SELECT p.updated_at, 2 * p.rowid + 1, p.session_id, p.ip_key, x.prompt_json,
                   x.text, x.finish_reason NOT IN ('length', 'cancelled'), 0, p.reasons, p.comment
            FROM preferences p JOIN responses x ON x.id = p.response_b_id
            WHERE p.outcome = 'both_bad'
            ORDER BY t, k
            """
        )
        return [
            {
                "prompt": json.loads(row["prompt_json"]),
                "completion": row["text"],
                "finished": bool(row["ended"]),
                "label": bool(row["label"]),
                "session_id": row["session_id"],
                "ip_key": row["ip_key"],
                **_reasons(row),
            }
            for row in rows
        ]

    def recent_prompts(self, limit: int) -> list[list[dict[str, str]]]:
        """Distinct prompts users asked, newest first: PPO rollouts start from these.

        Only conversations the server recorded: a single user turn, or a prompt stored
        with ``parent_id`` (its earlier turns were checked against the record when it
        was logged). Older multi-turn rows, and any with a system turn, are left out.
        """
        limit = check_count("limit", limit)
        rows = self._query(
            """
            SELECT prompt_json FROM responses
            WHERE parent_id IS NOT NULL
               OR (json_array_length(prompt_json) = 1
                   AND json_extract(prompt_json, '$[0].role') = 'user')
            GROUP BY prompt_json
            ORDER BY MAX(created_at) DESC, MAX(rowid) DESC LIMIT ?
            """,
            [limit],
        )
        return [json.loads(row["prompt_json"]) for row in rows]

    # -- adapter registry ----------------------------------------------------------

    def register_version(
        self,
        version: str,
        path: str | Path,
        parent: str | None = None,
        status: str = "candidate",
        metrics: dict[str, Any] | None = None,
    ) -> None:
        """Record an adapter that is already whole on disk (the row is written last)."""
        check_version("version", version)
        if parent is not None:
            check_version("parent", parent)
        check_choice("status", status, VERSION_STATUSES)
        row = {
            "version": version,
            "parent": parent,
            "path": check_str("path", str(path), MAX_TEXT_BYTES),
            "status": status,
            "metrics_json": encode_json("metrics", metrics or {}),
            "created_at": utc_now(),
        }
        with self._write() as db:
            versions = db.table("adapter_versions")
            if versions.count_where("version = ?", [version]):
                raise InvalidInputError(
                    f"adapter version {version} is already registered"
                )
            if status == "active":
                self._retire_active(db)
            versions.insert(row)

    def set_version_status(self, version: str, status: str) -> None:
        """Change a version's status; 'active' goes through activate(): one active."""
        check_choice("status", status, VERSION_STATUSES)
        if status == "active":
            self.activate(version)
            return
        with self._write() as db:
            self._get(db, "adapter_versions", version, "adapter version")
            db.table("adapter_versions").update(version, {"status": status})

    def activate(self, version: str) -> None:
        """Serve ``version`` from now on; the old active one becomes 'retired'.

        Rolling back is activating an older version again.
        """
        with self._write() as db:
            row = self._get(db, "adapter_versions", version, "adapter version")
            if row["status"] == "rejected":
                raise InvalidInputError(
                    f"adapter version {version} was rejected by the gate; "
                    "rejected versions are never served"
                )
            self._retire_active(db)
            # An admin may retry a version marked broken (after fixing its files); if it
            # is still unloadable, the server marks it broken again.
            db.table("adapter_versions").update(
                version, {"status": "active", "broken_reason": None}
            )

    def mark_broken(self, version: str, reason: str) -> str | None:
        """The server refused ``version``: record why, and if it was the active one,
        serve the newest version that is still good instead (None: the base model).

        Stored in the registry, not in the server's memory, so a restart (or the worker)
        does not pick the broken version again.
        """
        check_version("version", version)
        reason = str(reason).replace("\x00", "")[-2000:] or "refused by the server"
        with self._write() as db:
            row = self._get(db, "adapter_versions", version, "adapter version")
            versions = db.table("adapter_versions")
            versions.update(version, {"status": "broken", "broken_reason": reason})
            if row["status"] != "active":
                rows = list(db.query("SELECT version FROM adapter_versions WHERE status = 'active'"))
                return rows[0]["version"] if rows else None
            good = list(
                db.query(
                    f"SELECT version FROM adapter_versions WHERE status IN "
                    f"({', '.join('?' for _ in SERVABLE_STATUSES)}) AND version != ? "
                    "ORDER BY CAST(substr(version, 2) AS INTEGER) DESC LIMIT 1",
                    [*SERVABLE_STATUSES, version],
                )
            )
            if not good:
                return None
            versions.update(good[0]["version"], {"status": "active"})
            return str(good[0]["version"])

    @staticmethod
    def _retire_active(db: sqlite_utils.Database) -> None:
        versions = db.table("adapter_versions")
        for row in list(versions.rows_where("status = 'active'")):
            versions.update(row["version"], {"status": "retired"})

    def active_version(self) -> str | None:
        rows = self._query(
            "SELECT version FROM adapter_versions WHERE status = 'active'"
        )
        return rows[0]["version"] if rows else None

    def list_versions(self) -> list[dict[str, Any]]:
        """All versions in numeric order (v2 before v10), metrics decoded."""
        with self._read() as db:
            rows = list(
                db.table("adapter_versions").rows_where(
                    order_by="CAST(substr(version, 2) AS INTEGER)"
                )
            )
        return [_decode(row, "metrics") for row in rows]

    def next_version_name(self) -> str:
        """'v0' for an empty registry, else one more than the highest number."""
        rows = self._query(
            "SELECT MAX(CAST(substr(version, 2) AS INTEGER)) AS n FROM adapter_versions"
        )
        highest = rows[0]["n"]
        return "v0" if highest is None else f"v{int(highest) + 1}"

    # -- training runs -------------------------------------------------------------

    def start_run(self, kind: str) -> int:
        check_str("kind", kind, MAX_ID_BYTES)
        with self._write() as db:
            table = db.table("training_runs").insert(
                {"kind": kind, "status": "running", "started_at": utc_now()}
            )
            return _inserted_id(table)

    def log_metric(
        self, run_id: int, phase: str, step: int, name: str, value: float
    ) -> None:
        self.log_metrics(run_id, phase, step, {name: value})

    def log_metrics(
        self, run_id: int, phase: str, step: int, metrics: dict[str, float]
    ) -> None:
        """Several curves at one step, in one transaction. NaN is stored as NULL."""
        check_choice("phase", phase, PHASES)
        step = check_count("step", step)
        if not isinstance(metrics, dict):
            raise InvalidInputError(
                f"metrics must be a dict, got {kind_of(metrics)}"
            )
        now = utc_now()
        rows: list[dict[str, Any]] = []
        for name, value in metrics.items():
            check_str("metric name", name, MAX_ID_BYTES)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
                not is_finite_number(value) and isinstance(value, numbers.Integral)
            ):  # NaN and infinity are results (stored as NULL / inf); an int past a float is not
                raise InvalidInputError(
                    f"metric {shown(name)} must be a number, got {shown(value)}"
                )
            rows.append(
                {
                    "run_id": run_id,
                    "phase": phase,
                    "step": step,
                    "name": name,
                    "value": float(value),
                    "created_at": now,
                }
            )
        with self._write() as db:
            self._get(db, "training_runs", run_id, "training run")
            db.table("run_metrics").insert_all(rows)

    def finish_run(
        self,
        run_id: int,
        status: str,
        summary: dict[str, Any] | None = None,
        error: str | None = None,
        candidate_version: str | None = None,
    ) -> None:
        """Close a running run. A long error keeps its tail: recording must not fail."""
        check_choice("status", status, FINISHED_RUN_STATUSES)
        if candidate_version is not None:
            check_version("candidate_version", candidate_version)
        updates: dict[str, Any] = {
            "status": status,
            "finished_at": utc_now(),
            "summary_json": None
            if summary is None
            else encode_json("summary", summary),
            "candidate_version": candidate_version,
        }
        if error is not None:
            error = str(error).replace("\x00", "")
            updates["error"] = error.encode("utf-8", "replace")[
                -MAX_TEXT_BYTES:
            ].decode("utf-8", "ignore")
        with self._write() as db:
            row = self._get(db, "training_runs", run_id, "training run")
            if row["status"] != "running":
                raise InvalidInputError(
                    f"training run {run_id} already finished ({row['status']})"
                )
            db.table("training_runs").update(run_id, updates)

    def list_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first, summary decoded."""
        limit = check_count("limit", limit)
        with self._read() as db:
            rows = list(
                db.table("training_runs").rows_where(order_by="id DESC", limit=limit)
            )
        return [_decode(row, "summary") for row in rows]

    def run_metrics(self, run_id: int) -> list[dict[str, Any]]:
        with self._read() as db:
            self._get(db, "training_runs", run_id, "training run")
            return list(
                db.table("run_metrics").rows_where(
                    "run_id = ?", [run_id], order_by="id"
                )
            )

    def mark_stale_runs_failed(self) -> int:
        """At worker start, a run still 'running' died with its process: fail it."""
        with self._write() as db:
            runs = db.table("training_runs")
            stale = [row["id"] for row in runs.rows_where("status = 'running'")]
            for run_id in stale:
                runs.update(
                    run_id,
                    {
                        "status": "failed",
                        "finished_at": utc_now(),
                        "error": "interrupted",
                    },
                )
        return len(stale)

    # -- privacy ---------------------------------------------------------------------

    def delete_session_data(self, session_id: str) -> dict[str, int]:
        """Forget a session: its votes, responses, chats, and votes on its responses."""
        check_str("session_id", session_id, MAX_ID_BYTES)
        own_conversations = "SELECT id FROM conversations WHERE session_id = :s"
        own_responses = (
            f"SELECT id FROM responses WHERE session_id = :s "
            f"OR conversation_id IN ({own_conversations})"
        )
        # Children before parents, so foreign keys hold at every step.
        plan = [
            (
                "preferences",
                (
                    f"session_id = :s OR response_a_id IN ({own_responses}) "
                    f"OR response_b_id IN ({own_responses})"
                ),
            ),
            ("ratings", f"session_id = :s OR response_id IN ({own_responses})"),
            ("responses", f"id IN ({own_responses})"),
            ("messages", f"conversation_id IN ({own_conversations})"),
            ("conversations", "session_id = :s"),
        ]
        deleted: dict[str, int] = {}
        with self._write() as db:
            for table_name, where in plan:
                table = db.table(table_name)
                deleted[table_name] = table.count_where(where, {"s": session_id})
                table.delete_where(where, {"s": session_id})
        return deleted

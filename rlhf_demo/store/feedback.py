"""FeedbackStore: every read and write of votes, responses, adapters and runs.

One SQLite file in WAL mode, shared by the serving process (Gradio handlers in many
threads) and the worker process. Each write is one ``BEGIN IMMEDIATE`` transaction,
committed before the method returns, so a vote the UI confirmed is on disk; a write
that fails leaves nothing behind. Inputs are validated before any SQL runs.
"""

from __future__ import annotations

import json
import numbers
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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
from .schema import immediate_transaction, migrate
from .validate import (
    FINISHED_RUN_STATUSES,
    MAX_ID_BYTES,
    MAX_TEXT_BYTES,
    OUTCOMES,
    PHASES,
    ROLES,
    SOURCES,
    VERSION_STATUSES,
    check_choice,
    check_count,
    check_seconds,
    check_str,
    check_version,
    encode_json,
    encode_prompt,
    normalize_ts,
    utc_now,
)


def _decode(row: dict[str, Any], *fields: str) -> dict[str, Any]:
    """Turn ``x_json`` columns back into Python values under the key ``x``."""
    out = dict(row)
    for field in fields:
        raw = out.pop(f"{field}_json")
        out[field] = None if raw is None else json.loads(raw)
    return out


def _inserted_id(table: sqlite_utils.db.Table) -> int:
    """The integer id of the row just inserted (INTEGER PRIMARY KEY is the rowid)."""
    if table.last_rowid is None:  # pragma: no cover - sqlite always reports one
        raise StoreError(f"insert into {table.name} reported no row id")
    return table.last_rowid


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
        conn = sqlite3.connect(
            str(self.path), timeout=busy_timeout_ms / 1000, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self.db = sqlite_utils.Database(conn)
            migrate(self.db)
        except sqlite3.Error as exc:
            conn.close()
            raise translate_sqlite_error(exc, busy_timeout_ms) from exc
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
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
            try:
                with immediate_transaction(self.db):
                    yield self.db
            except sqlite3.Error as exc:
                raise translate_sqlite_error(exc, self._busy_timeout_ms) from exc

    @contextmanager
    def _read(self) -> Iterator[sqlite_utils.Database]:
        with self._lock:
            try:
                yield self.db
            except sqlite3.Error as exc:
                raise translate_sqlite_error(exc, self._busy_timeout_ms) from exc

    def _query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        with self._read() as db:
            return list(db.query(sql, params or []))

    @staticmethod
    def _get(
        db: sqlite_utils.Database, table: str, key: object, what: str
    ) -> dict[str, Any]:
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise InvalidInputError(
                f"{what} id must be a string or integer, got {key!r}"
            )
        try:
            return db.table(table).get(key)
        except NotFoundError:
            raise UnknownIdError(f"unknown {what}: {key!r}") from None

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
    ) -> str:
        """Record what the model was shown and what it said; votes point at this id."""
        row = {
            "id": uuid.uuid4().hex,
            "session_id": check_str("session_id", session_id, MAX_ID_BYTES),
            "conversation_id": conversation_id,
            "prompt_json": encode_prompt(prompt),
            "text": check_str("text", text, MAX_TEXT_BYTES, allow_empty=True),
            "adapter_version": check_str(
                "adapter_version", adapter_version, MAX_ID_BYTES
            ),
            "sampling_json": encode_json("sampling", sampling),
            "prompt_tokens": check_count("prompt_tokens", prompt_tokens),
            "completion_tokens": check_count("completion_tokens", completion_tokens),
            "latency_s": check_seconds("latency_s", latency_s),
            "finish_reason": check_str("finish_reason", finish_reason, MAX_ID_BYTES),
            "created_at": utc_now(),
        }
        with self._write() as db:
            if conversation_id is not None:
                self._get(db, "conversations", conversation_id, "conversation")
            db.table("responses").insert(row)
        return str(row["id"])

    def get_response(self, response_id: str) -> dict[str, Any]:
        """The response row with ``prompt`` and ``sampling`` decoded from JSON."""
        with self._read() as db:
            row = self._get(db, "responses", response_id, "response")
        return _decode(row, "prompt", "sampling")

    def rate(self, session_id: str, response_id: str, value: int | None) -> None:
        """Thumbs up (1) or down (-1); voting again changes it; None removes it."""
        check_str("session_id", session_id, MAX_ID_BYTES)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value not in (1, -1)
        ):
            raise InvalidInputError(
                "a rating must be 1 (thumbs up), -1 (thumbs down) or None; "
                f"got {value!r}"
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
                if existing:
                    ratings.delete(existing[0]["id"])
            elif existing:
                ratings.update(existing[0]["id"], {"value": value, "updated_at": now})
            else:
                ratings.insert(
                    {
                        "session_id": session_id,
                        "response_id": response_id,
                        "value": value,
                        "created_at": now,
                        "updated_at": now,
                    }
                )

    def prefer(
        self,
        *,
        session_id: str,
        response_a_id: str,
        response_b_id: str,
        outcome: str,
        source: str,
    ) -> str:
        """An A/B vote between two answers to one prompt; returns the preference id."""
        check_str("session_id", session_id, MAX_ID_BYTES)
        check_choice("outcome", outcome, OUTCOMES)
        check_choice("source", source, SOURCES)
        if response_a_id == response_b_id:
            raise InvalidInputError("a preference needs two different responses")
        preference_id = uuid.uuid4().hex
        with self._write() as db:
            a = self._get(db, "responses", response_a_id, "response A")
            b = self._get(db, "responses", response_b_id, "response B")
            if a["prompt_json"] != b["prompt_json"]:
                raise InvalidInputError("responses A and B answer different prompts")
            db.table("preferences").insert(
                {
                    "id": preference_id,
                    "session_id": session_id,
                    "prompt_json": a["prompt_json"],
                    "response_a_id": response_a_id,
                    "response_b_id": response_b_id,
                    "outcome": outcome,
                    "source": source,
                    "created_at": utc_now(),
                }
            )
        return preference_id

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

        A rating counts by ``updated_at``, so a changed vote is new feedback too.
        """
        since = "" if iso_ts is None else normalize_ts(iso_ts)
        (row,) = self._query(
            """
            SELECT (SELECT COUNT(*) FROM ratings WHERE updated_at > ?)
                 + (SELECT COUNT(*) FROM preferences WHERE created_at > ?) AS n
            """,
            [since, since],
        )
        return int(row["n"])

    # -- training data -------------------------------------------------------------

    def preference_pairs(self) -> list[dict[str, Any]]:
        """Decisive A/B votes as prompt/chosen/rejected, oldest first (no ties)."""
        rows = self._query(
            """
            SELECT p.prompt_json, p.outcome, p.session_id,
                   a.text AS a_text, b.text AS b_text
            FROM preferences p
            JOIN responses a ON a.id = p.response_a_id
            JOIN responses b ON b.id = p.response_b_id
            WHERE p.outcome IN ('A', 'B')
            ORDER BY p.created_at, p.rowid
            """
        )
        return [
            {
                "prompt": json.loads(row["prompt_json"]),
                "chosen": row["a_text"] if row["outcome"] == "A" else row["b_text"],
                "rejected": row["b_text"] if row["outcome"] == "A" else row["a_text"],
                "session_id": row["session_id"],
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
        """Thumbs as prompt/completion/label; a both-bad vote gives two bad examples."""
        rows = self._query(
            """
            SELECT r.updated_at AS t, r.rowid AS k, r.session_id, x.prompt_json, x.text,
                   r.value = 1 AS label
            FROM ratings r JOIN responses x ON x.id = r.response_id
            UNION ALL
            SELECT p.created_at, 2 * p.rowid, p.session_id, x.prompt_json, x.text, 0
            FROM preferences p JOIN responses x ON x.id = p.response_a_id
            WHERE p.outcome = 'both_bad'
            UNION ALL
            SELECT p.created_at, 2 * p.rowid + 1, p.session_id, x.prompt_json, x.text, 0
            FROM preferences p JOIN responses x ON x.id = p.response_b_id
            WHERE p.outcome = 'both_bad'
            ORDER BY t, k
            """
        )
        return [
            {
                "prompt": json.loads(row["prompt_json"]),
                "completion": row["text"],
                "label": bool(row["label"]),
                "session_id": row["session_id"],
            }
            for row in rows
        ]

    def recent_prompts(self, limit: int) -> list[list[dict[str, str]]]:
        """Distinct prompts users asked, newest first: PPO rollouts start from these."""
        limit = check_count("limit", limit)
        rows = self._query(
            """
            SELECT prompt_json FROM responses GROUP BY prompt_json
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
            db.table("adapter_versions").update(version, {"status": "active"})

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
                f"metrics must be a dict, got {type(metrics).__name__}"
            )
        now = utc_now()
        rows: list[dict[str, Any]] = []
        for name, value in metrics.items():
            check_str("metric name", name, MAX_ID_BYTES)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InvalidInputError(
                    f"metric {name!r} must be a number, got {value!r}"
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

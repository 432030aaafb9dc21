"""The SQLite schema as explicit, numbered migrations.

The schema version lives in ``PRAGMA user_version``: it is part of the file header, so
it changes in the same transaction as the migration that sets it. Migration N is
``MIGRATIONS[N - 1]``; never edit one that has shipped, append a new one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import sqlite_utils

from .errors import StoreError

Migration = Callable[[sqlite_utils.Database], None]


@contextmanager
def immediate_transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error.

    IMMEDIATE takes the write lock up front, so a busy database fails before anything
    is read or written (a deferred transaction could fail half way, when it upgrades).
    sqlite-utils' table methods nest inside this as savepoints.
    """
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.conn.execute("COMMIT")
    except BaseException:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")
        raise


def _m1_initial(db: sqlite_utils.Database) -> None:
    """Every table: chat history, responses, votes, adapters, training runs."""
    db.table("conversations").create(
        {"id": str, "session_id": str, "created_at": str},
        pk="id",
        strict=True,
        not_null={"session_id", "created_at"},
    )
    db.table("messages").create(
        {
            "id": int,
            "conversation_id": str,
            "role": str,
            "content": str,
            "created_at": str,
        },
        pk="id",
        strict=True,
        not_null={"conversation_id", "role", "content", "created_at"},
        foreign_keys=[("conversation_id", "conversations", "id")],
    )
    db.table("responses").create(
        {
            "id": str,
            "session_id": str,
            "conversation_id": str,
            "prompt_json": str,
            "text": str,
            "adapter_version": str,
            "sampling_json": str,
            "prompt_tokens": int,
            "completion_tokens": int,
            "latency_s": float,
            "finish_reason": str,
            "created_at": str,
        },
        pk="id",
        strict=True,
        not_null={
            "session_id",
            "prompt_json",
            "text",
            "adapter_version",
            "sampling_json",
            "prompt_tokens",
            "completion_tokens",
            "latency_s",
            "finish_reason",
            "created_at",
        },
        foreign_keys=[("conversation_id", "conversations", "id")],
    )
    db.table("ratings").create(
        {
            "id": int,
            "session_id": str,
            "response_id": str,
            "value": int,
            "created_at": str,
            "updated_at": str,
        },
        pk="id",
        strict=True,
        not_null={"session_id", "response_id", "value", "created_at", "updated_at"},
        foreign_keys=[("response_id", "responses", "id")],
    )
    # One rating per (session, response): a second thumb changes the first one.
    db.table("ratings").create_index(["session_id", "response_id"], unique=True)
    db.table("preferences").create(
        {
            "id": str,
            "session_id": str,
            "prompt_json": str,
            "response_a_id": str,
            "response_b_id": str,
            "outcome": str,
            "source": str,
            "created_at": str,
        },
        pk="id",
        strict=True,
        not_null={
            "session_id",
            "prompt_json",
            "response_a_id",
            "response_b_id",
            "outcome",
            "source",
            "created_at",
        },
        foreign_keys=[
            ("response_a_id", "responses", "id"),
            ("response_b_id", "responses", "id"),
        ],
    )
    db.table("adapter_versions").create(
        {
            "version": str,
            "parent": str,
            "path": str,
            "status": str,
            "metrics_json": str,
            "created_at": str,
        },
        pk="version",
        strict=True,
        not_null={"path", "status", "metrics_json", "created_at"},
    )
    db.table("training_runs").create(
        {
            "id": int,
            "kind": str,
            "status": str,
            "started_at": str,
            "finished_at": str,
            "candidate_version": str,
            "summary_json": str,
            "error": str,
        },
        pk="id",
        strict=True,
        not_null={"kind", "status", "started_at"},
    )
    db.table("run_metrics").create(
        {
            "id": int,
            "run_id": int,
            "phase": str,
            "step": int,
            "name": str,
            "value": float,  # NULL when the metric was NaN (SQLite stores NaN as NULL)
            "created_at": str,
        },
        pk="id",
        strict=True,
        not_null={"run_id", "phase", "step", "name", "created_at"},
        foreign_keys=[("run_id", "training_runs", "id")],
    )


def _m2_indexes(db: sqlite_utils.Database) -> None:
    """Indexes for lookups that grow with traffic: votes by response, by time."""
    db.table("ratings").create_index(["response_id"])
    db.table("preferences").create_index(["response_a_id"])
    db.table("preferences").create_index(["response_b_id"])
    db.table("responses").create_index(["session_id"])
    db.table("responses").create_index(["created_at"])
    db.table("run_metrics").create_index(["run_id"])


def _m3_integrity(db: sqlite_utils.Database) -> None:
    """One vote per pair per voter, the IP group of each vote, chained turns, broken versions.

    - ``preferences``: one row per (voter, unordered pair of responses), enforced by a
      UNIQUE index, so a race of identical votes cannot store two; a changed vote is an
      update (``updated_at``). Duplicates already stored are reduced to the newest one.
    - ``ip_key`` on votes: a keyed hash of the voter's address (never the address), so
      training can cap one network's share of the data.
    - ``responses.parent_id``: the recorded answer whose conversation this prompt
      continues; PPO takes multi-turn prompts only from such server-recorded chains.
    - ``adapter_versions.broken_reason``: why the server refused a version ('broken').

    The ``session_id`` columns hold the server-issued visitor id (a signed cookie), never
    Gradio's client-chosen session hash; migration 7 renames them ``visitor_id``.
    """
    db.execute(
        """
        DELETE FROM preferences WHERE rowid NOT IN (
          SELECT MAX(rowid) FROM preferences
          GROUP BY session_id, min(response_a_id, response_b_id),
                   max(response_a_id, response_b_id))
        """
    )
    db.table("preferences").add_column("updated_at", str)
    db.execute("UPDATE preferences SET updated_at = created_at")
    db.table("preferences").add_column("ip_key", str)
    db.table("ratings").add_column("ip_key", str)
    db.table("responses").add_column("parent_id", str)
    db.table("adapter_versions").add_column("broken_reason", str)
    db.execute(f"CREATE UNIQUE INDEX {PAIR_VOTE_INDEX} ON preferences (session_id, {PAIR_KEY_SQL})")
    db.table("ratings").create_index(["ip_key"])
    db.table("preferences").create_index(["ip_key"])
    db.table("preferences").create_index(["updated_at"])


def _m4_reasons(db: sqlite_utils.Database) -> None:
    """Why a vote went that way, optional: ``reasons`` (a JSON list of tags from a fixed
    list) and a short ``comment`` on ratings (👎) and A/B votes; NULL when not given."""
    for table in ("ratings", "preferences"):
        db.table(table).add_column("reasons", str)
        db.table(table).add_column("comment", str)


def _m5_drop_dead_parts(db: sqlite_utils.Database) -> None:
    """Remove what nothing writes: the ``messages`` table (answers and their prompts live in
    ``responses``) and the statuses ``published`` (served: now ``retired``) and
    ``candidate`` (never passed the gate: now ``rejected``)."""
    db.execute("DROP TABLE IF EXISTS messages")
    db.execute("UPDATE adapter_versions SET status = 'retired' WHERE status = 'published'")
    db.execute("UPDATE adapter_versions SET status = 'rejected' WHERE status = 'candidate'")


def _m6_content_hash(db: sqlite_utils.Database) -> None:
    """``adapter_versions.content_hash``: the sha256 of a version's files when it was
    registered, so a version whose files changed since is refused (NULL: registered before
    hashes were kept, not checked)."""
    db.table("adapter_versions").add_column("content_hash", str)


def _m7_visitor_id(db: sqlite_utils.Database) -> None:
    """``session_id`` becomes ``visitor_id``: the column always held the server-issued
    visitor id, never a Gradio session. SQLite rewrites the indexes over a renamed column;
    the two whose names spell the old one are rebuilt under the new name."""
    for table in ("conversations", "responses", "ratings", "preferences"):
        db.execute(f"ALTER TABLE {table} RENAME COLUMN session_id TO visitor_id")
    db.execute("DROP INDEX idx_ratings_session_id_response_id")
    db.table("ratings").create_index(["visitor_id", "response_id"], unique=True)
    db.execute("DROP INDEX idx_responses_session_id")
    db.table("responses").create_index(["visitor_id"])


# The unordered pair {a, b}: a vote on (b, a) is a vote on the same pair as (a, b).
PAIR_KEY_SQL = "min(response_a_id, response_b_id), max(response_a_id, response_b_id)"
PAIR_VOTE_INDEX = "idx_preferences_one_vote_per_pair"

MIGRATIONS: list[Migration] = [
    _m1_initial,
    _m2_indexes,
    _m3_integrity,
    _m4_reasons,
    _m5_drop_dead_parts,
    _m6_content_hash,
    _m7_visitor_id,
]
LATEST_VERSION = len(MIGRATIONS)


def schema_version(db: sqlite_utils.Database) -> int:
    """The migration number this database file is at (0 for a new file)."""
    return int(db.conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite_utils.Database, target: int = LATEST_VERSION) -> int:
    """Apply migrations up to ``target``, one transaction each; return the new version.

    The version is re-read inside each transaction, so two processes opening the same
    new file at once do not both apply a migration.
    """
    if not 0 <= target <= LATEST_VERSION:
        raise ValueError(f"target must be between 0 and {LATEST_VERSION}, got {target}")
    current = schema_version(db)
    if current > LATEST_VERSION:
        raise StoreError(
            f"the feedback database is at schema version {current}, newer than this "
            f"code knows ({LATEST_VERSION}); upgrade rlhf_demo before opening it"
        )
    while current < target:
        with immediate_transaction(db):
            current = schema_version(db)
            if current >= target:
                break
            MIGRATIONS[current](db)
            current += 1
            db.conn.execute(f"PRAGMA user_version = {current}")
    return current

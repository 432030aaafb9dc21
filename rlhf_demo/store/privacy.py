""" "Delete my data": a visitor's chats, answers and votes, votes on their answers, and the
copies of their text the worker kept in run summaries (the gate's sample answers).

Deleted rows are overwritten on disk (``secure_delete``, set by :mod:`.db`) and the
write-ahead log is truncated afterwards when no reader holds it, so the text does not
linger in free pages, nor in a snapshot copied from the file.
"""

from __future__ import annotations

import json
from typing import Any

import sqlite_utils

from .db import StoreBase
from .validate import MAX_ID_BYTES, check_str, encode_json

_OWN_CONVERSATIONS = "SELECT id FROM conversations WHERE visitor_id = :s"
_OWN_RESPONSES = f"SELECT id FROM responses WHERE visitor_id = :s OR conversation_id IN ({_OWN_CONVERSATIONS})"
# Children before parents, so foreign keys hold at every step.
_PLAN = [
    (
        "preferences",
        f"visitor_id = :s OR response_a_id IN ({_OWN_RESPONSES}) OR response_b_id IN ({_OWN_RESPONSES})",
    ),
    ("ratings", f"visitor_id = :s OR response_id IN ({_OWN_RESPONSES})"),
    ("responses", f"id IN ({_OWN_RESPONSES})"),
    ("conversations", "visitor_id = :s"),
]


def _own_texts(db: sqlite_utils.Database, visitor_id: str) -> set[str]:
    """Every prompt turn and answer the visitor's recorded responses hold (none empty)."""
    texts: set[str] = set()
    for row in db.query(f"SELECT prompt_json, text FROM responses WHERE id IN ({_OWN_RESPONSES})", {"s": visitor_id}):
        texts.add(row["text"])
        texts.update(message["content"] for message in json.loads(row["prompt_json"]))
    return {text for text in texts if text.strip()}


def _mentions(value: Any, texts: set[str]) -> bool:
    if isinstance(value, str):
        return value in texts
    if isinstance(value, dict):
        return any(_mentions(v, texts) for v in value.values())
    if isinstance(value, list):
        return any(_mentions(v, texts) for v in value)
    return False


def _without(value: Any, texts: set[str]) -> Any:
    """``value`` less every list item that mentions one of ``texts`` (a sample: the prompt
    with the answer generated for it) and every mapping entry that is one."""
    if isinstance(value, dict):
        return {k: _without(v, texts) for k, v in value.items() if not (isinstance(v, str) and v in texts)}
    if isinstance(value, list):
        return [_without(v, texts) for v in value if not _mentions(v, texts)]
    return value


def _scrub_run_summaries(db: sqlite_utils.Database, texts: set[str]) -> int:
    """Remove ``texts`` from every run summary; returns how many summaries changed."""
    changed = 0
    for row in list(db.query("SELECT id, summary_json FROM training_runs WHERE summary_json IS NOT NULL")):
        summary = json.loads(row["summary_json"])
        if _mentions(summary, texts):
            db.table("training_runs").update(row["id"], {"summary_json": encode_json("summary", _without(summary, texts))})
            changed += 1
    return changed


class Privacy(StoreBase):
    """Forgetting a visitor."""

    def delete_visitor_data(self, visitor_id: str) -> dict[str, int]:
        """Forget a visitor: their votes, responses, chats, votes on their responses, and their
        prompts and answers in run summaries; returns how many of each went."""
        check_str("visitor_id", visitor_id, MAX_ID_BYTES)
        deleted: dict[str, int] = {}
        with self._write() as db:
            texts = _own_texts(db, visitor_id)
            for table_name, where in _PLAN:
                table = db.table(table_name)
                deleted[table_name] = table.count_where(where, {"s": visitor_id})
                table.delete_where(where, {"s": visitor_id})
            deleted["run summaries"] = _scrub_run_summaries(db, texts) if texts else 0
        self._truncate_log()
        return deleted

""" "Delete my data": a visitor's chats, answers and votes, and votes on their answers."""

from __future__ import annotations

from .db import StoreBase
from .validate import MAX_ID_BYTES, check_str

_OWN_CONVERSATIONS = "SELECT id FROM conversations WHERE session_id = :s"
_OWN_RESPONSES = f"SELECT id FROM responses WHERE session_id = :s OR conversation_id IN ({_OWN_CONVERSATIONS})"
# Children before parents, so foreign keys hold at every step.
_PLAN = [
    (
        "preferences",
        f"session_id = :s OR response_a_id IN ({_OWN_RESPONSES}) OR response_b_id IN ({_OWN_RESPONSES})",
    ),
    ("ratings", f"session_id = :s OR response_id IN ({_OWN_RESPONSES})"),
    ("responses", f"id IN ({_OWN_RESPONSES})"),
    ("conversations", "session_id = :s"),
]


class Privacy(StoreBase):
    """Forgetting a visitor."""

    def delete_session_data(self, session_id: str) -> dict[str, int]:
        """Forget a session: its votes, responses, chats, and votes on its responses."""
        check_str("session_id", session_id, MAX_ID_BYTES)
        deleted: dict[str, int] = {}
        with self._write() as db:
            for table_name, where in _PLAN:
                table = db.table(table_name)
                deleted[table_name] = table.count_where(where, {"s": session_id})
                table.delete_where(where, {"s": session_id})
        return deleted

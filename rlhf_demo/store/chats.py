"""Chats: conversations and the answers the model gave, with the turns the server recorded.

The ``visitor_id`` arguments and columns hold the *voter's identity*: the server-issued
visitor id in the app (see :mod:`rlhf_demo.visitors`), a fixed name in offline tools.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import sqlite_utils

from .db import StoreBase, decode, get_row
from .errors import InvalidInputError
from .validate import (
    MAX_ID_BYTES,
    MAX_TEXT_BYTES,
    check_count,
    check_seconds,
    check_str,
    encode_json,
    encode_prompt,
    utc_now,
)

MAX_CHAIN = 1000  # a conversation has a turn limit; a cycle in hand-edited data must not hang


def recorded_turns(db: sqlite_utils.Database, response_id: str, visitor_id: str) -> set[tuple[str, str]]:
    """Every (role, content) the server recorded along a chain of answers for one voter,
    followed through ``parent_id``."""
    turns: set[tuple[str, str]] = set()
    current: str | None = response_id
    for _ in range(MAX_CHAIN):
        if current is None:
            break
        row = get_row(db, "responses", current, "parent response")
        if row["visitor_id"] != visitor_id:
            raise InvalidInputError("that conversation belongs to another visitor")
        turns.add(("assistant", row["text"]))
        turns.update((m["role"], m["content"]) for m in json.loads(row["prompt_json"]))
        current = row.get("parent_id")
    return turns


class Chats(StoreBase):
    """Conversations and logged responses."""

    def new_conversation(self, visitor_id: str) -> str:
        check_str("visitor_id", visitor_id, MAX_ID_BYTES)
        conversation_id = uuid.uuid4().hex
        with self._write() as db:
            db.table("conversations").insert({"id": conversation_id, "visitor_id": visitor_id, "created_at": utc_now()})
        return conversation_id

    def log_response(
        self,
        *,
        visitor_id: str,
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
            "visitor_id": check_str("visitor_id", visitor_id, MAX_ID_BYTES),
            "conversation_id": conversation_id,
            "parent_id": parent_id,
            "prompt_json": prompt_json,
            "text": check_str("text", text, MAX_TEXT_BYTES, allow_empty=True),
            "adapter_version": check_str("adapter_version", adapter_version, MAX_ID_BYTES),
            "sampling_json": encode_json("sampling", sampling, finite=True),
            "prompt_tokens": check_count("prompt_tokens", prompt_tokens),
            "completion_tokens": check_count("completion_tokens", completion_tokens),
            "latency_s": check_seconds("latency_s", latency_s),
            "finish_reason": check_str("finish_reason", finish_reason, MAX_ID_BYTES),
            "created_at": utc_now(),
        }
        with self._write() as db:
            if conversation_id is not None:
                conversation = get_row(db, "conversations", conversation_id, "conversation")
                if conversation["visitor_id"] != visitor_id:
                    raise InvalidInputError("that conversation belongs to another visitor")
            if parent_id is not None:
                recorded = recorded_turns(db, parent_id, visitor_id)
                forged = [m for m in prompt[:-1] if (m["role"], m["content"]) not in recorded]
                if forged:
                    raise InvalidInputError(
                        f"the conversation holds {len(forged)} turn(s) the server never "
                        "recorded for this visitor; start a new chat"
                    )
            db.table("responses").insert(row)
        return str(row["id"])

    def get_response(self, response_id: str) -> dict[str, Any]:
        """The response row with ``prompt`` and ``sampling`` decoded from JSON."""
        with self._read() as db:
            row = get_row(db, "responses", response_id, "response")
        return decode(row, "prompt", "sampling")

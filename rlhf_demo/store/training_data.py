"""What the worker trains on: preference pairs, thumbs as labelled examples, prompts.

Rows come oldest first with the voter (``visitor_id``) and network (``ip_key``) of each
vote, so training can cap one voter's share (see :mod:`rlhf_demo.reward.fairness`).
"""

from __future__ import annotations

import json
from typing import Any

from .db import StoreBase
from .validate import check_count


def ended(alias: str) -> str:
    """SQL that is true when answer ``alias`` ended by itself: not cut at the length limit,
    not stopped by the visitor."""
    return f"{alias}.finish_reason NOT IN ('length', 'cancelled')"


def _reasons(row: dict[str, Any]) -> dict[str, Any]:
    """A vote's reason tags (a list, empty when none) and comment ("" when none)."""
    return {"reasons": json.loads(row["reasons"]) if row["reasons"] else [], "comment": row["comment"] or ""}


def _pair(row: dict[str, Any]) -> dict[str, Any]:
    """One decisive vote as prompt/chosen/rejected (+ whether each answer ended)."""
    a_won = row["outcome"] == "A"
    return {
        "prompt": json.loads(row["prompt_json"]),
        "chosen": row["a_text"] if a_won else row["b_text"],
        "rejected": row["b_text"] if a_won else row["a_text"],
        "chosen_finished": bool(row["a_ended"] if a_won else row["b_ended"]),
        "rejected_finished": bool(row["b_ended"] if a_won else row["a_ended"]),
        "visitor_id": row["visitor_id"],
        "ip_key": row["ip_key"],
        **_reasons(row),
    }


class TrainingData(StoreBase):
    """Reads that turn votes into training examples."""

    def preference_pairs(self) -> list[dict[str, Any]]:
        """Decisive A/B votes as prompt/chosen/rejected, oldest first (no ties); with
        ``chosen_finished``/``rejected_finished``: False for an answer cut at the length limit.

        Only pairs whose answers share one prompt: a pair that continues two conversations
        (each side with its own earlier answers) has no single prompt to train on, so its
        vote stays in the store without becoming a training pair."""
        rows = self._query(
            f"""
            SELECT p.prompt_json, p.outcome, p.visitor_id, p.ip_key, p.reasons, p.comment,
                   a.text AS a_text, b.text AS b_text, {ended("a")} AS a_ended, {ended("b")} AS b_ended
            FROM preferences p
            JOIN responses a ON a.id = p.response_a_id
            JOIN responses b ON b.id = p.response_b_id
            WHERE p.outcome IN ('A', 'B') AND a.prompt_json = b.prompt_json
            ORDER BY p.updated_at, p.rowid
            """
        )
        return [_pair(row) for row in rows]

    def version_votes(self) -> list[dict[str, Any]]:
        """Compare-tab votes between two different versions: the arena's match list.

        Each row: ``version_a``, ``version_b``, ``outcome`` (A / B / tie / both_bad),
        oldest first; no visitor ids.
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
        both_bad = """
            SELECT p.updated_at, {k}, p.visitor_id, p.ip_key, x.prompt_json, x.text, {ended}, 0,
                   p.reasons, p.comment
            FROM preferences p JOIN responses x ON x.id = p.{answer}
            WHERE p.outcome = 'both_bad'"""
        rows = self._query(
            f"""
            SELECT r.updated_at AS t, r.rowid AS k, r.visitor_id, r.ip_key, x.prompt_json,
                   x.text, {ended("x")} AS ended, r.value = 1 AS label, r.reasons, r.comment
            FROM ratings r JOIN responses x ON x.id = r.response_id
            UNION ALL {both_bad.format(k="2 * p.rowid", ended=ended("x"), answer="response_a_id")}
            UNION ALL {both_bad.format(k="2 * p.rowid + 1", ended=ended("x"), answer="response_b_id")}
            ORDER BY t, k
            """
        )
        return [
            {
                "prompt": json.loads(row["prompt_json"]),
                "completion": row["text"],
                "finished": bool(row["ended"]),
                "label": bool(row["label"]),
                "visitor_id": row["visitor_id"],
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

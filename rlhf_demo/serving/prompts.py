"""Bounded prompts: every request is cut to a fixed budget before it costs the model anything.

A request is checked on cheap measures first (message count, characters: no tokenizer), then
tokenized once; when it is over the token budget the oldest turns are dropped by their token
counts (one batched tokenizer call), never by re-tokenizing the conversation per dropped
message. What cannot fit (the system message and the last message alone) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
_MAX_PASSES = 3  # token-trimming passes; each re-templates once (estimates are per message)


class PromptRefused(ValueError):
    """The request is over the prompt budget; the message is meant for the visitor."""


@dataclass(frozen=True)
class PromptBudget:
    """The most one request may ask of the model before generation starts."""

    max_tokens: int = 1536
    max_messages: int = 64  # every role counts, not only user turns
    max_chars: int = 48_000  # all messages together; the oldest turns go first


def _checked(messages: Any, budget: PromptBudget) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise PromptRefused("The conversation is empty or malformed.")
    if len(messages) > budget.max_messages:
        raise PromptRefused(
            f"The conversation has {len(messages)} messages; the limit is {budget.max_messages}. Press Clear to start a new one."
        )
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise PromptRefused("The conversation may hold only text messages from system, user and assistant.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _first_droppable(messages: list[dict[str, str]]) -> int:
    return 1 if messages[0]["role"] == "system" else 0


def _trim_chars(messages: list[dict[str, str]], budget: PromptBudget) -> list[dict[str, str]]:
    """Drop the oldest turns until the characters fit (no tokenizer involved)."""
    keep = _first_droppable(messages)
    sizes = [len(m["content"]) for m in messages]
    total, cut = sum(sizes), keep
    while total > budget.max_chars and cut < len(messages) - 1:
        total -= sizes[cut]
        cut += 1
    if total > budget.max_chars:
        raise PromptRefused(f"The message is too long for the model: {total} characters, the limit is {budget.max_chars}.")
    return messages[:keep] + messages[cut:]


def _template(tokenizer: Any, messages: list[dict[str, str]]) -> Any:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def encode(tokenizer: Any, messages: Any, budget: PromptBudget) -> tuple[list[dict[str, str]], Any]:
    """The conversation as the model will see it (oldest turns dropped to fit) and its token ids
    (``input_ids``/``attention_mask``, batch of one); :class:`PromptRefused` if it cannot fit."""
    kept = _trim_chars(_checked(messages, budget), budget)
    ids = _template(tokenizer, kept)
    if ids["input_ids"].shape[1] <= budget.max_tokens:
        return kept, ids
    counts = [len(x) for x in tokenizer([m["content"] for m in kept], add_special_tokens=False)["input_ids"]]
    for _ in range(_MAX_PASSES):
        total = int(ids["input_ids"].shape[1])
        overhead = max(0.0, (total - sum(counts)) / len(kept))  # template tokens per message
        keep, cut = _first_droppable(kept), _first_droppable(kept)
        excess: float = total - budget.max_tokens
        while excess > 0 and cut < len(kept) - 1:
            excess -= counts[cut] + overhead
            cut += 1
        if cut == keep:  # nothing left to drop: the system message and the last one are too long
            break
        kept, counts = kept[:keep] + kept[cut:], counts[:keep] + counts[cut:]
        ids = _template(tokenizer, kept)
        if ids["input_ids"].shape[1] <= budget.max_tokens:
            return kept, ids
    raise PromptRefused(
        f"The message is too long for the model: {int(ids['input_ids'].shape[1])} tokens, the limit is {budget.max_tokens}."
    )

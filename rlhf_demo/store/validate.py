"""Input checks run before any SQL: a bad value is refused with a clear message.

Limits keep one abusive request from filling the disk; NUL bytes are refused because
they truncate text in many tools downstream (and tokenizers treat them oddly).
"""

from __future__ import annotations

import json
import math
import numbers
import re
from datetime import UTC, datetime

from .errors import InvalidInputError

MAX_TEXT_BYTES = 64 * 1024  # one message or one response
MAX_PROMPT_BYTES = 256 * 1024  # a whole chat history, JSON-encoded
MAX_ID_BYTES = 200  # visitor ids, kinds, names
MAX_INTEGER = 2**63 - 1  # SQLite's INTEGER; Python would raise OverflowError past it
_TYPE_WORDS = {
    type(None): "None",
    bool: "true/false",
    int: "a number",
    float: "a number",
    str: "text",
    bytes: "bytes",
    list: "a list",
    tuple: "a list",
    dict: "a mapping",
}
ROLES = ("system", "user", "assistant")
SIDES = ("A", "B")  # a decisive A/B vote names the better answer
OUTCOMES = (*SIDES, "tie", "both_bad")  # every stored A/B vote
SOURCES = ("two_samples", "two_versions")
FINISHED_RUN_STATUSES = ("succeeded", "failed", "rejected")
PHASES = ("reward", "ppo", "gate")
# Why a 👎 or an A/B vote went that way: a fixed list, so the tags can be counted and filtered.
REASON_TAGS = ("wrong", "unhelpful", "unsafe", "too long", "rude")
MAX_COMMENT_CHARS = 500  # a rater's note, not an essay (the UI's textbox has the same cap)
_VERSION_RE = re.compile(r"^v(0|[1-9][0-9]*)$")


def kind_of(value: object) -> str:
    """A value's type in words for a message (never "NoneType")."""
    return _TYPE_WORDS.get(type(value), "an object")


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a refusal must not echo a megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def utc_now() -> str:
    """ISO-8601 UTC, microseconds: one fixed format, so text order is time order."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def normalize_ts(iso_ts: str) -> str:
    """Parse any ISO timestamp (naive means UTC) into the store's own format."""
    try:
        parsed = datetime.fromisoformat(iso_ts)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"not an ISO-8601 timestamp: {shown(iso_ts)}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).isoformat(timespec="microseconds")


def check_str(name: str, value: object, max_bytes: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a string, got {kind_of(value)}")
    if len(value) > max_bytes:  # a character is at least one byte: refused before any copy
        raise InvalidInputError(f"{name} is {len(value)} characters, over the limit of {max_bytes} bytes")
    if not allow_empty and not value.strip():
        raise InvalidInputError(f"{name} must not be empty")
    if "\x00" in value:
        raise InvalidInputError(f"{name} contains a NUL character")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidInputError(f"{name} is not valid Unicode text") from exc
    if size > max_bytes:
        raise InvalidInputError(f"{name} is {size} bytes, over the limit of {max_bytes}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidInputError(f"{name} must be one of {', '.join(choices)}; got {shown(value)}")
    return value


def check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) <= MAX_INTEGER:
        raise InvalidInputError(f"{name} must be a whole number from 0 to {MAX_INTEGER}, got {shown(value)}")
    return int(value)


def is_finite_number(value: object) -> bool:
    """A real number a float can hold (an int too large for one is not: OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_seconds(name: str, value: object) -> float:
    if not is_finite_number(value) or float(value) < 0:  # type: ignore[arg-type]  # a finite Real
        raise InvalidInputError(f"{name} must be a finite number >= 0, got {shown(value)}")
    return float(value)  # type: ignore[arg-type]


def check_key(what: str, key: object) -> str | int:
    """An id to look up: text of at most MAX_ID_BYTES, or an integer SQLite can hold."""
    if isinstance(key, int) and not isinstance(key, bool):
        if not -MAX_INTEGER - 1 <= key <= MAX_INTEGER:
            raise InvalidInputError(f"{what} id {shown(key)} is larger than any id")
        return key
    if not isinstance(key, str):
        raise InvalidInputError(f"{what} id must be a string or integer, got {shown(key)}")
    return check_str(f"{what} id", key, MAX_ID_BYTES)


def check_version(name: str, value: object) -> str:
    if not isinstance(value, str) or not _VERSION_RE.match(value):
        raise InvalidInputError(f"{name} must look like 'v0', 'v12'; got {shown(value)}")
    return value


def encode_json(name: str, value: object, finite: bool = False) -> str:
    """``value`` (a dict) as JSON. ``finite``: NaN and infinity are refused (they are not
    JSON; Python writes them anyway). Worker summaries keep them: a NaN loss is a result."""
    if not isinstance(value, dict):
        raise InvalidInputError(f"{name} must be a dict, got {kind_of(value)}")
    try:
        text = json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=not finite)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(f"{name} must hold only text, finite numbers, true/false, None, lists and mappings") from exc
    return check_str(name, text, MAX_PROMPT_BYTES)


def encode_prompt(prompt: object) -> str:
    """Canonical JSON for a chat prompt, so equal prompts compare equal as text."""
    if not isinstance(prompt, list) or not prompt:
        raise InvalidInputError("prompt must be a non-empty list of chat messages")
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise InvalidInputError(f"prompt[{i}] must be a dict with exactly the keys 'role' and 'content'")
        role = check_choice(f"prompt[{i}]['role']", message["role"], ROLES)
        content = check_str(
            f"prompt[{i}]['content']",
            message["content"],
            MAX_TEXT_BYTES,
            allow_empty=True,
        )
        messages.append({"role": role, "content": content})
    return check_str("prompt", json.dumps(messages, ensure_ascii=False), MAX_PROMPT_BYTES)


def check_reasons(tags: object, comment: object) -> tuple[list[str], str]:
    """Reason tags (from :data:`REASON_TAGS` only, in that order, no repeats) and a short
    comment (whitespace trimmed; empty means none), both optional."""
    if tags is None:
        tags = []
    if not isinstance(tags, (list, tuple)):
        raise InvalidInputError(f"reasons must be a list of tags, got {kind_of(tags)}")
    if len(tags) > len(REASON_TAGS):
        raise InvalidInputError(f"at most {len(REASON_TAGS)} reasons, got {len(tags)}")
    for tag in tags:
        if not isinstance(tag, str) or tag not in REASON_TAGS:
            raise InvalidInputError(f"unknown reason {shown(tag, 40)}; the reasons are: {', '.join(REASON_TAGS)}")
    if comment is None:
        comment = ""
    text = check_str("comment", comment, 4 * MAX_COMMENT_CHARS, allow_empty=True).strip()
    if len(text) > MAX_COMMENT_CHARS:
        raise InvalidInputError(f"the comment is {len(text)} characters, over the limit of {MAX_COMMENT_CHARS}")
    return [t for t in REASON_TAGS if t in tags], text

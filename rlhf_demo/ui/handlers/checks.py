"""Checks on what the browser sends: every value is hostile until one of these accepts it.

Each check returns the value in the shape the handlers use, or raises :class:`UserError`
with a message written for the visitor (nothing has been written at that point).
"""

from __future__ import annotations

from typing import Any, TypeGuard

from rlhf_demo.config import Limits
from rlhf_demo.serving import strip_control
from rlhf_demo.store.validate import is_finite_number  # also False for a JSON integer too large for a float
from rlhf_demo.visitors import Visitor


class UserError(ValueError):
    """Bad input from a visitor: shown to them as is, nothing written."""


# 👍 is True or "Like", 👎 False or "Dislike"; None removes, and so does "" (Gradio's Chatbot
# sends it when the visitor clicks the selected thumb again).
LIKED = {True: 1, False: -1, "Like": 1, "Dislike": -1, None: None, "": None}


def check_message(message: Any, limits: Limits) -> str:
    """A chat or Compare prompt: text the tokenizer and the store accept, within the limit."""
    if not isinstance(message, str):
        raise UserError("A message must be text.")
    if len(message) > limits.max_message_chars:  # before any work per character
        raise UserError(f"The message is too long: {len(message)} characters, the limit is {limits.max_message_chars}.")
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): the tokenizer and the store refuse it
        raise UserError("The message holds characters that are not valid text; please send plain text.") from None
    if "\x00" in message:
        raise UserError("The message contains a NUL byte; please send plain text.")
    text = strip_control(message).strip()
    if not text:
        raise UserError("The message is empty.")
    if len(text) > limits.max_message_chars:
        raise UserError(f"The message is too long: {len(text)} characters, the limit is {limits.max_message_chars}.")
    return text


def check_visitor(visitor: Any) -> Visitor:
    """The server-issued identity; a plain string is a visitor id (tests, offline tools)."""
    if isinstance(visitor, str):
        visitor = Visitor(visitor)
    if not isinstance(visitor, Visitor) or not isinstance(visitor.id, str) or not visitor.id.strip():
        raise UserError("No visitor id: reload the page.")
    return visitor


def check_sampling(temperature: Any = None, top_p: Any = None, max_new_tokens: Any = None) -> dict[str, Any]:
    """Finite numbers or None (the default); out-of-range values are clamped later by the
    server, but NaN and infinity are refused: they pass every ``min``/``max``."""
    checked: dict[str, Any] = {}
    for name, label, value in (
        ("temperature", "Temperature", temperature),
        ("top_p", "Top-p", top_p),
        ("max_new_tokens", "Max new tokens", max_new_tokens),
    ):
        if value is None:
            checked[name] = None
            continue
        if not is_finite_number(value):
            raise UserError(f"{label} must be a finite number, got {str(value)[:20]!r}.")
        if name == "max_new_tokens":
            if value != int(value):
                raise UserError(f"{label} must be a whole number.")
            value = max(1, min(int(value), 10**6))
        checked[name] = value
    return checked


def message_text(content: Any) -> str:
    """A chat message's text, whichever shape Gradio hands it in."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):  # {"type": "text", "text": ...}: how the server sends text
        return str(content.get("text", ""))
    if isinstance(content, list):  # Gradio 6 may hand back [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def _text_part(part: Any) -> bool:
    """A piece of list-shaped message content: text, or a dict whose ``text`` (if any) is text."""
    return isinstance(part, str) or (isinstance(part, dict) and isinstance(part.get("text", ""), str))


def check_chat(chat: Any, max_messages: int) -> list[dict[str, Any]]:
    """The browser's chat value as a list of user/assistant messages, or a clear refusal."""
    if chat is None:
        return []
    if not isinstance(chat, list) or len(chat) > max_messages:
        raise UserError("The chat history is malformed; press Clear to start a new one.")
    for message in chat:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant") or "content" not in message:
            raise UserError("The chat history may hold only your messages and the model's answers; press Clear.")
        content = message["content"]
        if not isinstance(content, (str, list)) or (isinstance(content, list) and not all(_text_part(p) for p in content)):
            raise UserError("The chat history is malformed; press Clear to start a new one.")
    return list(chat)


def check_index(value: Any, what: str = "message") -> int:
    """A chat position: an integer (or an integral float, as gr.Number sends), never a bool,
    NaN or text. Gradio's like events may send ``[index]`` or ``[row, col]``."""
    if isinstance(value, (list, tuple)) and 1 <= len(value) <= 2:
        value = value[0]
    if not is_finite_number(value) or value != int(value) or value < 0:
        raise UserError(f"That {what} position is not valid.")
    return int(value)


def check_event(data: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """The payload of a Gradio event (``gr.EventData``): a dict with ``keys``, or a refusal."""
    payload = getattr(data, "_data", data)
    if not isinstance(payload, dict) or any(k not in payload for k in keys):
        raise UserError("This action arrived without its event data; reload the page.")
    return payload


def check_liked(liked: Any) -> int | None:
    """+1, -1 or None (remove) from a thumb; anything else is refused (``bool("Dislike")``
    is True: never coerce)."""
    if not (liked is None or isinstance(liked, (bool, str))) or liked not in LIKED:
        raise UserError("A vote must be like (true) or dislike (false).")
    return LIKED[liked]


def two_strings(value: Any) -> TypeGuard[tuple[str, str]]:
    """A pair state's ids or versions: exactly two strings."""
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, str) for v in value)

"""Plain functions behind every UI event, one class per tab, callable from tests without a browser.

Each handler validates its input first and raises :class:`UserError` with a message meant
for the visitor; nothing is written in that case. Votes are committed to SQLite before a
handler returns, so "recorded" in the UI always means recorded on disk.

Everything the browser sends is hostile: the identity is a :class:`~rlhf_demo.visitors.Visitor`
the server issued (never Gradio's session hash), numbers must be finite, booleans booleans.
"""

from __future__ import annotations

from rlhf_demo.ui.handlers.chat import ChatHandlers, ChatState, tag_version
from rlhf_demo.ui.handlers.checks import UserError, check_event, message_text
from rlhf_demo.ui.handlers.compare import SOURCES, VOTE_LABELS, CompareHandlers, PairState
from rlhf_demo.ui.handlers.data import DataHandlers


class Handlers(ChatHandlers, CompareHandlers, DataHandlers):
    """Every tab's verbs over one runtime: one page's tabs share the vote rate limits."""


__all__ = [
    "VOTE_LABELS",
    "SOURCES",
    "ChatHandlers",
    "ChatState",
    "CompareHandlers",
    "DataHandlers",
    "Handlers",
    "PairState",
    "UserError",
    "check_event",
    "message_text",
    "tag_version",
]

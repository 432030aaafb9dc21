"""The Chat tab's verbs: send, retry, undo, stop, clear, 👍/👎 and the reasons after a 👎.

The chat history the model sees is the server's record of that visitor's conversation;
the browser's copy is for display and must match that record.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rlhf_demo.selection import Pick, best_answer
from rlhf_demo.ui.handlers.base import TabHandlers
from rlhf_demo.ui.handlers.checks import (
    UserError,
    check_chat,
    check_index,
    check_liked,
    check_message,
    check_sampling,
    check_visitor,
    message_text,
)
from rlhf_demo.visitors import Visitor

FENCE_CLOSE = "\n```````"  # closes any open ``` fence (a closing fence may be longer); rare in answers
VERSION_TAG = re.compile(r"(?:\n```````)?\n\n<sub>written by adapter [^<]*</sub>$")
_FENCE_LINE = re.compile(r"^ {0,3}```", re.MULTILINE)
CHAT_MISMATCH = "This chat does not match the server's record of your conversation; press Clear to start a new one."
REASONS_SAID = {"updated": "Thanks: your reasons were saved with your vote.", "removed": "Reasons removed from your vote."}
VOTE_SAID = {
    "created": "{thumb} recorded.",
    "updated": "Vote changed to {thumb}.",
    "unchanged": "{thumb} was already recorded.",
    "removed": "Vote removed.",
    "absent": "There was no vote to remove.",
}


@dataclass
class ChatState:
    """One page session's chat: which recorded response each answer in the chat is."""

    conversation_id: str | None = None
    response_ids: dict[int, str] = field(default_factory=dict)  # chat index -> response id
    stop_requested: bool = False  # the Stop button: the answer being written ends at the next token
    disliked: str | None = None  # the response this page last voted 👎: the one reasons go to


def tag_version(text: str, version: str, picked_from: int = 1) -> str:
    """The answer plus which version wrote it (and, for best-of-n, from how many samples the
    reward model picked it); an answer cut off inside a code block gets the block closed
    first, or the tag would show as raw text inside it."""
    if len(_FENCE_LINE.findall(text)) % 2:
        text += FENCE_CLOSE
    picked = f", picked from {picked_from}" if picked_from > 1 else ""
    return f"{text}\n\n<sub>written by adapter {version}{picked}</sub>"


def clean_history(chat: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The chat without our display-only version tags (what the record holds)."""
    return [{"role": m["role"], "content": VERSION_TAG.sub("", message_text(m["content"]))} for m in chat]


def check_chat_state(state: Any) -> ChatState:
    """The page's chat state (held by the server, but never trusted to be whole)."""
    if not isinstance(state, ChatState) or not isinstance(state.response_ids, dict):
        raise UserError("This page lost its chat state; reload the page.")
    return state


class ChatHandlers(TabHandlers):
    """Chat: every answer is generated from the server's record and recorded before it is rateable."""

    def recorded_history(self, visitor: Visitor, chat: list[dict[str, Any]], state: ChatState) -> tuple[list[dict[str, str]], str | None]:
        """The server's record of the conversation that ``chat`` shows, and the id of its
        last answer; refused when the browser's copy differs from the record.

        The record of an answer is the prompt it was generated from plus its text. The
        model may have seen fewer of the oldest turns (context budget), so the browser's
        copy must *end with* the record."""
        if not chat:
            return [], None
        last = len(chat) - 1
        response_id = state.response_ids.get(last)
        if chat[-1]["role"] != "assistant" or response_id is None:
            raise UserError(CHAT_MISMATCH)
        row = self.own_response(visitor, response_id)
        record = [*row["prompt"], {"role": "assistant", "content": row["text"]}]
        shown = clean_history(chat)
        if len(record) > len(shown) or shown[len(shown) - len(record) :] != record:
            raise UserError(CHAT_MISMATCH)
        return record, response_id

    def _checked(self, visitor: Any, chat: Any, state: Any) -> tuple[Visitor, list[dict[str, Any]], ChatState]:
        return check_visitor(visitor), check_chat(chat, 2 * self.limits.max_turns + 2), check_chat_state(state)

    def chat(
        self,
        visitor: Visitor | str,
        message: Any,
        chat: Any,
        state: ChatState,
        temperature: Any = None,
        top_p: Any = None,
        max_new_tokens: Any = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """Stream an answer into the chat; record it (with its exact prompt) when done."""
        text = check_message(message, self.limits)
        sampling = check_sampling(temperature, top_p, max_new_tokens)
        visitor, chat, state = self._checked(visitor, chat, state)
        if sum(1 for m in chat if m["role"] == "user") >= self.limits.max_turns:
            raise UserError(f"This conversation reached {self.limits.max_turns} turns; press Clear to start a new one.")
        record, parent = self.recorded_history(visitor, chat, state)
        chat.append({"role": "user", "content": text})
        state.stop_requested = False
        yield chat
        yield from self._answer(visitor, chat, [*record, {"role": "user", "content": text}], parent, state, sampling)

    def retry(self, visitor: Visitor | str, chat: Any, state: ChatState, index: Any, **sampling: Any) -> Iterator[list[dict[str, Any]]]:
        """Answer a question again: drop its answer (and what followed) and generate anew.

        ``index`` is the question's position, as Gradio 6's Chatbot sends it
        (``gr.RetryData.index`` is the *user* message), or the answer's position."""
        checked = check_sampling(**sampling)
        visitor, chat, state = self._checked(visitor, chat, state)
        position = check_index(index)
        if position >= len(chat):
            raise UserError("Nothing to retry.")
        chat = chat[: position + 1] if chat[position]["role"] == "user" else chat[:position]
        if not chat or chat[-1]["role"] != "user":
            raise UserError("Nothing to retry.")
        text = check_message(message_text(chat[-1]["content"]), self.limits)
        record, parent = self.recorded_history(visitor, chat[:-1], state)
        self._forget_from(state, len(chat))
        state.stop_requested = False
        yield chat
        yield from self._answer(visitor, chat, [*record, {"role": "user", "content": text}], parent, state, checked)

    def undo(self, chat: Any, state: ChatState, index: Any) -> tuple[list[dict[str, Any]], str]:
        """Remove the last exchange from the chat; its stored answer and votes stay (the data is kept)."""
        chat = check_chat(chat, 2 * self.limits.max_turns + 2)
        state = check_chat_state(state)
        cut = check_index(index)
        if cut >= len(chat):
            raise UserError("That message position is not valid.")
        if chat[cut]["role"] == "assistant":
            cut -= 1  # undoing an answer also removes the question that led to it
        self._forget_from(state, max(cut, 0))
        removed = chat[max(cut, 0) :]
        last_user = next((message_text(m["content"]) for m in removed if m["role"] == "user"), "")
        return chat[: max(cut, 0)], last_user

    @staticmethod
    def clear(state: ChatState) -> tuple[list[dict[str, Any]], ChatState]:
        return [], ChatState()

    @staticmethod
    def stop(state: Any) -> str:
        """Stop the answer being written: it ends at its next token and is kept (and recorded,
        so it can be rated and the conversation goes on)."""
        if not isinstance(state, ChatState):
            raise UserError("Nothing to stop.")
        state.stop_requested = True
        return ""

    @staticmethod
    def _forget_from(state: ChatState, index: int) -> None:
        for key in [k for k in state.response_ids if k >= index]:
            del state.response_ids[key]

    def _answer(
        self,
        visitor: Visitor,
        chat: list[dict[str, Any]],
        prompt: list[dict[str, str]],
        parent: str | None,
        state: ChatState,
        sampling: dict[str, Any],
    ) -> Iterator[list[dict[str, Any]]]:
        """Generate from the server's ``prompt`` (never the browser's chat) and record it."""
        pick: Pick | None = None
        server, best_of = self.runtime.server, self.runtime.settings.selection.best_of
        stream = best_answer(server, self.runtime.judge, prompt, server.sampling(**sampling), best_of, should_stop=lambda: state.stop_requested)
        for item in stream:
            if isinstance(item, Pick):
                pick = item
            else:
                yield [*chat, {"role": "assistant", "content": item}]
        assert pick is not None
        result = pick.generation
        if state.conversation_id is None:
            state.conversation_id = self.runtime.store.new_conversation(visitor.id)
        response_id = self.record(visitor, result, state.conversation_id, parent)
        state.response_ids[len(chat)] = response_id
        yield [*chat, {"role": "assistant", "content": tag_version(result.text, result.version, pick.picked_from)}]

    def like(self, visitor: Visitor | str, state: ChatState, index: Any, liked: Any) -> str:
        """👍/👎 on the answer at chat ``index``; one vote per answer per visitor (a second
        thumb changes it); None removes it."""
        visitor = check_visitor(visitor)
        state = check_chat_state(state)
        if isinstance(index, (float, str)) or index is None:
            raise UserError("That message is not a rated answer (wait until it has finished).")
        position = check_index(index)
        if position not in state.response_ids:
            raise UserError("That message is not a rated answer (wait until it has finished).")
        value = check_liked(liked)
        response_id = state.response_ids[position]
        self.own_response(visitor, response_id)
        self.check_vote_rate(visitor)
        result = self.runtime.store.rate(visitor.id, response_id, value, ip_key=visitor.ip_key)
        state.disliked = response_id if value == -1 else None
        return VOTE_SAID[result.change].format(thumb={1: "👍", -1: "👎", None: ""}[value])

    def thumb_reasons(self, visitor: Visitor | str, state: ChatState, tags: Any, comment: Any) -> str:
        """Reason tags and a comment for the answer this page last voted 👎 (the store checks
        them: tags from the fixed list, a short comment)."""
        visitor = check_visitor(visitor)
        state = check_chat_state(state)
        if state.disliked is None:
            raise UserError("Vote 👎 on an answer first; the reasons go with that vote.")
        self.check_vote_rate(visitor)
        result = self.runtime.store.annotate_rating(visitor.id, state.disliked, tags, comment)
        return REASONS_SAID[result.change]

    def rate_api(self, visitor: Visitor | str, state: ChatState, index: Any, liked: Any) -> str:
        """The same vote for API clients: ``index`` may be an integral float (gr.Number)."""
        if isinstance(index, float) and math.isfinite(index) and index == int(index):
            index = int(index)
        return self.like(visitor, state, index, liked)

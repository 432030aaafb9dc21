"""The Chat tab's verbs: send, retry, undo, stop, clear, 👍/👎 and the reasons after a 👎.

The chat history the model sees is the server's record of the page's conversation, found by
the response ids the server issued; the browser's copy of the chat is for display only.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rlhf_demo.runtime import Runtime
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
)
from rlhf_demo.visitors import Visitor

FENCE_CLOSE = "\n```````"  # closes any open ``` fence (a closing fence may be longer); rare in answers
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
    messages: list[dict[str, str]] = field(default_factory=list)  # the chat as the server shows it
    stop_requested: bool = False  # the Stop button: the answer being written ends at the next token
    disliked: str | None = None  # the response this page last voted 👎: the one reasons go to

    def restart(self) -> None:
        """Forget the conversation in place: Gradio keeps this object as the page's state."""
        fresh = ChatState()
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(fresh, f.name))


VERSION_TAG = re.compile(r"\s*(?:<sub>)?written by adapter ([\w.-]+)(?:, picked from (\d+))?(?:</sub>)?\s*$")
"""What :func:`tag_version` appends, as markdown or as the page's text (benches read it)."""


def read_version_tag(shown: str) -> tuple[str, str | None, int]:
    """``(answer, version, picked_from)`` of a tagged answer; version None without a tag."""
    match = VERSION_TAG.search(shown)
    if match is None:
        return shown, None, 1
    return shown[: match.start()], match.group(1), int(match.group(2) or 1)


def tag_version(text: str, version: str, picked_from: int = 1) -> str:
    """The answer plus which version wrote it (and, for best-of-n, from how many samples the
    reward model picked it); an answer cut off inside a code block gets the block closed
    first, or the tag would show as raw text inside it."""
    if len(_FENCE_LINE.findall(text)) % 2:
        text += FENCE_CLOSE
    picked = f", picked from {picked_from}" if picked_from > 1 else ""
    return f"{text}\n\n<sub>written by adapter {version}{picked}</sub>"


def check_chat_state(state: Any) -> ChatState:
    """The page's chat state (held by the server, but never trusted to be whole)."""
    lost = UserError("This page lost its chat state; reload the page.")
    if not isinstance(state, ChatState) or not isinstance(state.response_ids, dict) or not isinstance(state.messages, list):
        raise lost
    answers = {i for i, m in enumerate(state.messages) if isinstance(m, dict) and m.get("role") == "assistant"}
    if set(state.response_ids) != answers:  # every answer shown is a recorded one, and only those
        raise lost
    return state


class ChatHandlers(TabHandlers):
    """Chat: every answer is generated from the server's record and recorded before it is rateable.

    The browser's chat value is display only: it is checked (garbage is refused) but never
    compared with the record, because Gradio re-renders text (it dedents and expands tabs).
    Each visitor's latest chat is kept in memory, so that a reload brings it back."""

    SAVED_CHATS = 1000  # visitors whose chat a reload brings back (the most recent ones)

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.saved: OrderedDict[str, ChatState] = OrderedDict()

    def remember(self, visitor: Visitor, state: ChatState) -> None:
        """Keep a copy of this visitor's chat for their next page load."""
        self.saved[visitor.id] = copy.deepcopy(dataclasses.replace(state, stop_requested=False))
        self.saved.move_to_end(visitor.id)
        while len(self.saved) > self.SAVED_CHATS:
            self.saved.popitem(last=False)

    def restore(self, visitor: Visitor | str) -> ChatState:
        """The visitor's last chat (a copy: each page goes on from it on its own), or a new one."""
        saved = self.saved.get(check_visitor(visitor).id)
        return copy.deepcopy(saved) if saved is not None else ChatState()

    def forget(self, visitor: Visitor | str) -> None:
        self.saved.pop(check_visitor(visitor).id, None)

    def recorded_history(
        self, visitor: Visitor, state: ChatState, upto: int | None = None
    ) -> tuple[list[dict[str, str]], str | None]:
        """The server's record of this page's conversation up to message ``upto`` (all when
        None), and the id of its last answer. The record of an answer is the prompt it was
        generated from plus its text (the model may have seen fewer of the oldest turns)."""
        shown = state.messages[:upto]
        if not shown:
            return [], None
        response_id = state.response_ids.get(len(shown) - 1)
        if shown[-1]["role"] != "assistant" or response_id is None:
            raise UserError(CHAT_MISMATCH)
        row = self.own_response(visitor, response_id)
        return [*row["prompt"], {"role": "assistant", "content": row["text"]}], response_id

    def _checked(self, visitor: Any, chat: Any, state: Any) -> tuple[Visitor, ChatState]:
        check_chat(chat, 2 * self.limits.max_turns + 2)  # refused when malformed, else unused
        return check_visitor(visitor), check_chat_state(state)

    def chat(
        self,
        visitor: Visitor | str,
        message: Any,
        chat: Any,
        state: ChatState,
        temperature: Any = None,
        top_p: Any = None,
        max_new_tokens: Any = None,
    ) -> Iterator[list[dict[str, str]]]:
        """Stream an answer into the chat; record it (with its exact prompt) when done."""
        text = check_message(message, self.limits)
        sampling = check_sampling(temperature, top_p, max_new_tokens)
        visitor, state = self._checked(visitor, chat, state)
        if chat == [] and state.messages:  # the page shows no conversation: this asks a new one
            state.restart()
        if sum(1 for m in state.messages if m["role"] == "user") >= self.limits.max_turns:
            raise UserError(f"This conversation reached {self.limits.max_turns} turns; press Clear to start a new one.")
        record, parent = self.recorded_history(visitor, state)
        yield from self._answer(visitor, [*state.messages, {"role": "user", "content": text}], record, parent, state, sampling)

    def retry(
        self, visitor: Visitor | str, chat: Any, state: ChatState, index: Any, text: Any = None, **sampling: Any
    ) -> Iterator[list[dict[str, str]]]:
        """Answer a question again (or its edited ``text``): drop its answer and what followed,
        and generate anew. The new answer branches from the same parent; the old branch stays
        recorded.

        ``index`` is the question's position, as Gradio 6's Chatbot sends it
        (``gr.RetryData.index`` is the *user* message), or the answer's position."""
        edited = None if text is None else check_message(text, self.limits)
        checked = check_sampling(**sampling)
        visitor, state = self._checked(visitor, chat, state)
        position = check_index(index)
        if position >= len(state.messages):
            raise UserError("Nothing to retry.")
        question = position if state.messages[position]["role"] == "user" else position - 1
        if question < 0 or (edited is not None and question != position):
            raise UserError("Nothing to retry." if edited is None else "Only your own messages can be edited.")
        record, parent = self.recorded_history(visitor, state, question)
        asked = state.messages[question] if edited is None else {"role": "user", "content": edited}
        yield from self._answer(visitor, [*state.messages[:question], asked], record, parent, state, checked)

    def undo(self, chat: Any, state: ChatState, index: Any) -> tuple[list[dict[str, str]], str]:
        """Remove the last exchange from the chat; its stored answer and votes stay (the data is kept)."""
        check_chat(chat, 2 * self.limits.max_turns + 2)
        state = check_chat_state(state)
        cut = check_index(index)
        if cut >= len(state.messages):
            raise UserError("That message position is not valid.")
        if state.messages[cut]["role"] == "assistant":
            cut -= 1  # undoing an answer also removes the question that led to it
        cut = max(cut, 0)
        removed = state.messages[cut:]
        self._forget_from(state, cut)
        return list(state.messages), next((m["content"] for m in removed if m["role"] == "user"), "")

    @staticmethod
    def clear(state: ChatState) -> tuple[list[dict[str, str]], ChatState]:
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
        """Messages from ``index`` on leave the page's conversation (their records stay)."""
        del state.messages[index:]
        for key in [k for k in state.response_ids if k >= index]:
            del state.response_ids[key]

    def _answer(
        self,
        visitor: Visitor,
        chat: list[dict[str, str]],
        record: list[dict[str, str]],
        parent: str | None,
        state: ChatState,
        sampling: dict[str, Any],
    ) -> Iterator[list[dict[str, str]]]:
        """Answer the question that ends ``chat`` (the server's copy) from the server's
        ``record`` (never the browser's chat), record it, and make it the page's conversation.
        With best-of-n on, the answer is the reward model's pick of n samples (and says so)."""
        state.stop_requested = False
        yield chat
        pick: Pick | None = None
        server, best_of = self.runtime.server, self.runtime.settings.selection.best_of or 1  # the Runtime filled in the device's
        prompt = [*record, chat[-1]]
        stream = best_answer(
            server, self.runtime.judge, prompt, server.sampling(**sampling), best_of, should_stop=lambda: state.stop_requested
        )
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
        self._forget_from(state, len(chat) - 1)
        state.messages.extend(
            [chat[-1], {"role": "assistant", "content": tag_version(result.text, result.version, pick.picked_from)}]
        )
        state.response_ids[len(chat)] = response_id
        yield list(state.messages)

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

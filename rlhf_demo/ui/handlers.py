"""Plain functions behind every UI event, callable from tests without a browser.

Each handler validates its input first and raises :class:`UserError` with a message meant
for the visitor; nothing is written in that case. Votes are committed to SQLite before a
handler returns, so "recorded" in the UI always means recorded on disk.

Everything the browser sends is hostile: the identity is a :class:`Visitor` the server
issued (never Gradio's session hash), numbers must be finite, booleans booleans, and the
chat history the model sees is the server's record of that visitor's conversation; the
browser's copy is for display and must match that record.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rlhf_demo.admin import AdminGate, AdminRefused
from rlhf_demo.hub_sync import push_after_deletion
from rlhf_demo.runtime import Runtime
from rlhf_demo.serving import Generation, strip_control
from rlhf_demo.store import StoreError, export_preferences, export_unpaired
from rlhf_demo.store.validate import is_finite_number  # also False for a JSON integer too large for a float
from rlhf_demo.visitors import Visitor

log = logging.getLogger(__name__)

FENCE_CLOSE = "\n```````"  # closes any open ``` fence (a closing fence may be longer); rare in answers
VERSION_TAG = re.compile(r"(?:\n```````)?\n\n<sub>written by adapter [^<]*</sub>$")
_FENCE_LINE = re.compile(r"^ {0,3}```", re.MULTILINE)
OUTCOMES = {"A is better": "A", "B is better": "B", "Tie": "tie", "Both bad": "both_bad"}
SOURCES = {"Two samples of the active policy": "two_samples", "Active vs previous version": "two_versions"}


class UserError(ValueError):
    """Bad input from a visitor: shown to them as is, nothing written."""


CHAT_MISMATCH = "This chat does not match the server's record of your conversation; press Clear to start a new one."
REASONS_SAID = {"updated": "Thanks: your reasons were saved with your vote.", "removed": "Reasons removed from your vote."}
EXPORT_WRITERS = {"preferences": export_preferences, "unpaired": export_unpaired}


@dataclass
class ChatState:
    """One page session's chat: which recorded response each answer in the chat is."""

    conversation_id: str | None = None
    response_ids: dict[int, str] = field(default_factory=dict)  # chat index -> response id
    stop_requested: bool = False  # the Stop button: the answer being written ends at the next token
    disliked: str | None = None  # the response this page last voted 👎: the one reasons go to


@dataclass
class PairState:
    """The Compare tab's current pair; versions are revealed only after the vote."""

    response_ids: tuple[str, str] | None = None
    versions: tuple[str, str] | None = None
    source: str = "two_samples"
    voted: bool = False
    generating: bool = False  # answers are still streaming: no vote yet


def tag_version(text: str, version: str) -> str:
    """The answer plus which version wrote it; an answer cut off inside a code block gets the
    block closed first, or the tag would show as raw text inside it."""
    if len(_FENCE_LINE.findall(text)) % 2:
        text += FENCE_CLOSE
    return f"{text}\n\n<sub>written by adapter {version}</sub>"


def clean_history(chat: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The chat without our display-only version tags (what the record holds)."""
    return [{"role": m["role"], "content": VERSION_TAG.sub("", message_text(m["content"]))} for m in chat]


def message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
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


def check_chat_state(state: Any) -> ChatState:
    """The page's chat state (held by the server, but never trusted to be whole)."""
    if not isinstance(state, ChatState) or not isinstance(state.response_ids, dict):
        raise UserError("This page lost its chat state; reload the page.")
    return state


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


LIKED = {True: 1, False: -1, "Like": 1, "Dislike": -1, None: None}


def check_liked(liked: Any) -> int | None:
    """👍 is True or "Like", 👎 False or "Dislike", None removes; anything else is refused
    (``bool("Dislike")`` is True: never coerce)."""
    if not (liked is None or isinstance(liked, (bool, str))) or liked not in LIKED:
        raise UserError("A vote must be like (true) or dislike (false).")
    return LIKED[liked]


class RateLimiter:
    """At most ``limit`` events per key in any 60 s window (in memory, per process).

    Keys are visitor ids and hashed addresses; idle keys are dropped so that a client
    rotating identities cannot grow the table without bound."""

    def __init__(self, limit: int, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.max_keys = max_keys
        self._events: dict[str, deque[float]] = {}

    def _window(self, key: str, now: float) -> deque[float]:
        window = self._events.setdefault(key, deque())
        while window and now - window[0] > 60:
            window.popleft()
        return window

    def allows(self, key: str) -> bool:
        return len(self._window(key, time.monotonic())) < self.limit

    def record(self, key: str) -> None:
        now = time.monotonic()
        self._window(key, now).append(now)
        if len(self._events) > self.max_keys:
            for stale in [k for k, w in self._events.items() if not w or now - w[-1] > 60]:
                del self._events[stale]

    def check(self, key: str) -> None:
        if not self.allows(key):
            raise UserError(f"Too many votes: at most {self.limit} per minute. Please wait a moment.")
        self.record(key)


def _two(value: Any) -> bool:
    """A pair state's ids or versions: exactly two strings."""
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, str) for v in value)


# A browser that blocks our cookie is a new visitor on each request (identity never comes from
# Gradio's session hash), so its own answers look like someone else's: say what helps.
OWNER_REFUSAL = (
    "That answer was written for another visitor. If it was yours, your browser did not send this site's cookie: "
    "allow it, or open the app in its own tab (or sign in, where offered)."
)


class Handlers:
    """The UI's verbs over one :class:`Runtime`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.limits = runtime.settings.limits
        self.votes = RateLimiter(self.limits.votes_per_minute)  # per visitor
        self.ip_votes = RateLimiter(self.limits.votes_per_minute_per_ip)  # per address
        self.admin = AdminGate(runtime.settings.admin_token, runtime.signer, runtime.settings.trust_proxy)

    # ----- validation -------------------------------------------------------------------
    def check_message(self, message: Any) -> str:
        if not isinstance(message, str):
            raise UserError("A message must be text.")
        try:
            message.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): the tokenizer and the store refuse it
            raise UserError("The message holds characters that are not valid text; please send plain text.") from None
        if "\x00" in message:
            raise UserError("The message contains a NUL byte; please send plain text.")
        text = strip_control(message).strip()
        if not text:
            raise UserError("The message is empty.")
        if len(text) > self.limits.max_message_chars:
            raise UserError(f"The message is too long: {len(text)} characters, the limit is {self.limits.max_message_chars}.")
        return text

    @staticmethod
    def check_visitor(visitor: Any) -> Visitor:
        """The server-issued identity; a plain string is a visitor id (tests, offline tools)."""
        if isinstance(visitor, str):
            visitor = Visitor(visitor)
        if not isinstance(visitor, Visitor) or not isinstance(visitor.id, str) or not visitor.id.strip():
            raise UserError("No visitor id: reload the page.")
        return visitor

    check_session = check_visitor  # the old name

    @staticmethod
    def check_sampling(temperature: Any = None, top_p: Any = None, max_new_tokens: Any = None) -> dict[str, Any]:
        """Finite numbers or None (the default); out-of-range values are clamped later by
        the server, but NaN and infinity are refused: they pass every ``min``/``max``."""
        checked: dict[str, Any] = {}
        for name, label, value in (("temperature", "Temperature", temperature), ("top_p", "Top-p", top_p), ("max_new_tokens", "Max new tokens", max_new_tokens)):
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

    def _check_vote_rate(self, visitor: Visitor) -> None:
        """Per visitor and per address; nothing counted unless both allow the vote."""
        keys = [(self.votes, f"v:{visitor.id}")]
        if visitor.ip_key:
            keys.append((self.ip_votes, f"ip:{visitor.ip_key}"))
        for limiter, key in keys:
            if not limiter.allows(key):
                raise UserError(f"Too many votes: at most {limiter.limit} per minute. Please wait a moment.")
        for limiter, key in keys:
            limiter.record(key)

    def _own_response(self, visitor: Visitor, response_id: str) -> dict[str, Any]:
        row = self.runtime.store.get_response(response_id)
        if row["session_id"] != visitor.id:
            raise UserError(OWNER_REFUSAL)
        return row

    # ----- chat -------------------------------------------------------------------------
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
        row = self._own_response(visitor, response_id)
        record = [*row["prompt"], {"role": "assistant", "content": row["text"]}]
        shown = clean_history(chat)
        if len(record) > len(shown) or shown[len(shown) - len(record) :] != record:
            raise UserError(CHAT_MISMATCH)
        return record, response_id

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
        visitor = self.check_visitor(visitor)
        text = self.check_message(message)
        sampling = self.check_sampling(temperature, top_p, max_new_tokens)
        state = check_chat_state(state)
        chat = check_chat(chat, 2 * self.limits.max_turns + 2)
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
        visitor = self.check_visitor(visitor)
        checked = self.check_sampling(**sampling)
        state = check_chat_state(state)
        chat = check_chat(chat, 2 * self.limits.max_turns + 2)
        position = check_index(index)
        if position >= len(chat):
            raise UserError("Nothing to retry.")
        chat = chat[: position + 1] if chat[position]["role"] == "user" else chat[:position]
        if not chat or chat[-1]["role"] != "user":
            raise UserError("Nothing to retry.")
        text = self.check_message(message_text(chat[-1]["content"]))
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
        result: Generation | None = None
        server = self.runtime.server
        stream = server.stream(prompt, None, server.sampling(**sampling), should_stop=lambda: state.stop_requested)
        for item in stream:
            if isinstance(item, Generation):
                result = item
            else:
                yield [*chat, {"role": "assistant", "content": item}]
        assert result is not None
        if state.conversation_id is None:
            state.conversation_id = self.runtime.store.new_conversation(visitor.id)
        response_id = self._log(visitor, result, state.conversation_id, parent)
        state.response_ids[len(chat)] = response_id
        yield [*chat, {"role": "assistant", "content": tag_version(result.text, result.version)}]

    def _log(self, visitor: Visitor, result: Generation, conversation_id: str | None, parent: str | None = None) -> str:
        return self.runtime.store.log_response(
            session_id=visitor.id,
            prompt=result.prompt,
            text=result.text,
            adapter_version=result.version,
            sampling={"temperature": result.sampling.temperature, "top_p": result.sampling.top_p, "max_new_tokens": result.sampling.max_new_tokens},
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            latency_s=result.latency_s,
            finish_reason=result.finish_reason,
            conversation_id=conversation_id,
            parent_id=parent,
        )

    def like(self, visitor: Visitor | str, state: ChatState, index: Any, liked: Any) -> str:
        """👍/👎 on the answer at chat ``index``; one vote per answer per visitor (a second
        thumb changes it); None removes it."""
        visitor = self.check_visitor(visitor)
        state = check_chat_state(state)
        if isinstance(index, float) or isinstance(index, str) or index is None:
            raise UserError("That message is not a rated answer (wait until it has finished).")
        position = check_index(index)
        if position not in state.response_ids:
            raise UserError("That message is not a rated answer (wait until it has finished).")
        value = check_liked(liked)
        response_id = state.response_ids[position]
        self._own_response(visitor, response_id)
        self._check_vote_rate(visitor)
        result = self.runtime.store.rate(visitor.id, response_id, value, ip_key=visitor.ip_key)
        state.disliked = response_id if value == -1 else None
        thumb = {1: "👍", -1: "👎", None: ""}[value]
        return {
            "created": f"{thumb} recorded.",
            "updated": f"Vote changed to {thumb}.",
            "unchanged": f"{thumb} was already recorded.",
            "removed": "Vote removed.",
            "absent": "There was no vote to remove.",
        }[result.change]

    def thumb_reasons(self, visitor: Visitor | str, state: ChatState, tags: Any, comment: Any) -> str:
        """Reason tags and a comment for the answer this page last voted 👎 (the store checks
        them: tags from the fixed list, a short comment)."""
        visitor = self.check_visitor(visitor)
        state = check_chat_state(state)
        if state.disliked is None:
            raise UserError("Vote 👎 on an answer first; the reasons go with that vote.")
        self._check_vote_rate(visitor)
        result = self.runtime.store.annotate_rating(visitor.id, state.disliked, tags, comment)
        return REASONS_SAID[result.change]

    def rate_api(self, visitor: Visitor | str, state: ChatState, index: Any, liked: Any) -> str:
        """The same vote for API clients: ``index`` may be an integral float (gr.Number)."""
        if isinstance(index, float) and math.isfinite(index) and index == int(index):
            index = int(index)
        return self.like(visitor, state, index, liked)

    # ----- compare ----------------------------------------------------------------------
    def compare(self, visitor: Visitor | str, message: Any, source_label: Any, **sampling: Any) -> tuple[str, str, PairState]:
        """Two answers to one prompt from one batched call; which version wrote which stays hidden."""
        *_, (a, b, state) = self.compare_stream(visitor, message, source_label, **sampling)
        return a, b, state

    def compare_stream(self, visitor: Visitor | str, message: Any, source_label: Any, **sampling: Any) -> Iterator[tuple[str, str, PairState]]:
        """:meth:`compare`, streamed: ``(a, b, state)`` as both answers grow (``state.generating``
        until both are finished and recorded; no vote before that)."""
        visitor = self.check_visitor(visitor)
        text = self.check_message(message)
        checked = {k: v for k, v in self.check_sampling(**sampling).items() if v is not None}
        source = SOURCES.get(source_label, source_label) if isinstance(source_label, str) else None
        if source not in SOURCES.values():
            raise UserError(f"Unknown comparison source {str(source_label)[:40]!r}.")
        active = self.runtime.server.active
        if source == "two_versions":
            previous = self.previous_version(active)
            if previous is None:
                raise UserError("There is no previous version yet: compare two samples instead.")
            versions = [active, previous]
            random.shuffle(versions)  # blind: position must not reveal the version
        else:
            versions = [active, active]
        state = PairState(source=source, generating=True)
        results: list[Generation] = []
        server = self.runtime.server
        for item in server.stream_pair([{"role": "user", "content": text}], (versions[0], versions[1]), server.sampling(**checked)):
            if isinstance(item, list):
                results = item
            else:
                yield item[0], item[1], state
        ids = tuple(self._log(visitor, r, None) for r in results)
        state.response_ids, state.versions, state.generating = (ids[0], ids[1]), (versions[0], versions[1]), False
        yield results[0].text, results[1].text, state

    @staticmethod
    def new_round(state: Any = None) -> PairState:
        """A fresh pair: the previous one stays recorded (and voted, or not)."""
        return PairState()

    def previous_version(self, active: str) -> str | None:
        """The version that was served before ``active`` and is still loadable."""
        published = [v for v in self.runtime.store.list_versions() if v["status"] in ("active", "retired")]
        names = [v["version"] for v in published]
        if active not in names:
            return names[-1] if names else None
        position = names.index(active)
        if position == 0:
            return None
        previous = names[position - 1]
        row = next(v for v in published if v["version"] == previous)
        self.runtime.server.load_version(previous, row["path"])
        return previous

    def vote_pair(self, visitor: Visitor | str, state: PairState, outcome_label: Any) -> tuple[str, PairState]:
        """Record an A/B vote (voting again on the same pair changes it), then reveal which
        version wrote which answer."""
        visitor = self.check_visitor(visitor)
        outcome = OUTCOMES.get(outcome_label, outcome_label) if isinstance(outcome_label, str) else None
        if outcome not in OUTCOMES.values():
            raise UserError(f"Unknown outcome {str(outcome_label)[:40]!r}.")
        if isinstance(state, PairState) and state.generating:
            raise UserError("Wait until both answers are finished.")
        if not isinstance(state, PairState) or not _two(state.response_ids) or not _two(state.versions):
            raise UserError("Generate a pair first.")
        a, b = state.response_ids
        self._own_response(visitor, a)
        self._own_response(visitor, b)  # both: a pair must not mix in another visitor's answer
        self._check_vote_rate(visitor)
        result = self.runtime.store.record_preference(
            session_id=visitor.id, response_a_id=a, response_b_id=b, outcome=outcome, source=state.source, ip_key=visitor.ip_key
        )
        state.voted = True
        said = {"created": "Vote recorded.", "updated": "Vote changed.", "unchanged": "That vote was already recorded."}[result.change]
        return f"{said} A was written by **{state.versions[0]}**, B by **{state.versions[1]}**.", state

    def pair_reasons(self, visitor: Visitor | str, state: PairState, tags: Any, comment: Any) -> str:
        """Reason tags and a comment for this page's vote on the current pair."""
        visitor = self.check_visitor(visitor)
        if not isinstance(state, PairState) or not _two(state.response_ids) or not state.voted:
            raise UserError("Vote on a pair first; the reasons go with that vote.")
        self._check_vote_rate(visitor)
        a, b = state.response_ids
        result = self.runtime.store.annotate_preference(visitor.id, a, b, tags, comment)
        return REASONS_SAID[result.change]

    # ----- data -------------------------------------------------------------------------
    def counts_markdown(self) -> str:
        counts = self.runtime.store.counts()
        per_voter = self.runtime.store.votes_per_session()
        top = ", ".join(str(n) for n in per_voter[:10]) or "none yet"
        return (
            f"**Responses** {counts['responses']} · **👍** {counts['thumbs_up']} · **👎** {counts['thumbs_down']} · "
            f"**A/B pairs** {counts['preferences']} · **ties** {counts['ties']} · **both bad** {counts['both_bad']} · "
            f"**voters** {counts['sessions']}  \nVotes per voter (largest first, no identities): {top}"
        )

    def model_markdown(self) -> str:
        d = self.runtime.describe()
        warning = "\n\n⚠️ **This is the tiny random test model: its answers are noise.**" if self.runtime.loaded.source.is_test_model else ""
        return f"**Model:** {d['model']}  \n**Active adapter:** {d['active_adapter']}  \n**Data directory:** `{d['data_dir']}`{warning}"

    def export(self, kind: Any, include_session_ids: bool = False, admin_token: Any = "") -> str:
        """Write a TRL-format JSONL into the exports folder and return its path."""
        if include_session_ids:
            self.require_admin(admin_token)
        if not isinstance(kind, str) or kind not in EXPORT_WRITERS:
            raise UserError(f"Unknown export {str(kind)[:40]!r}.")
        folder = self.runtime.settings.exports_dir
        folder.mkdir(parents=True, exist_ok=True)
        suffix = "-with-sessions" if include_session_ids else ""
        path = folder / f"{kind}{suffix}.jsonl"
        EXPORT_WRITERS[kind](self.runtime.store, path, include_session_ids=include_session_ids)
        return str(path)

    def require_admin(self, token: Any) -> None:
        try:
            self.admin.check(token)
        except AdminRefused as exc:
            raise UserError(str(exc)) from None

    # ----- admin (each needs the token; the UI renders these only when one is configured) ---
    def rollback(self, version: Any, admin_token: Any) -> str:
        """Pin the served version to any published one (the server picks it up on its next poll)."""
        self.require_admin(admin_token)
        if not isinstance(version, str) or not version:
            raise UserError("Choose a version.")
        self.runtime.store.activate(version)
        served = self.runtime.sync_registry()
        return f"Now serving {served}."

    def reset_to_base(self, admin_token: Any) -> str:
        """Serve the base model without any adapter; the versions stay for a later rollback."""
        self.require_admin(admin_token)
        active = self.runtime.store.active_version()
        if active is not None:
            self.runtime.store.set_version_status(active, "retired")
        return f"Now serving {self.runtime.sync_registry()}."

    def train_now(self, admin_token: Any) -> str:
        from rlhf_demo.worker.status import request_training

        self.require_admin(admin_token)
        request_training(self.runtime.settings.worker_dir)
        return "Training requested: the worker starts a cycle on its next poll."

    def delete_my_data(self, visitor: Visitor | str) -> str:
        """Forget everything this visitor sent, and rewrite every export that held it.

        Exports this app knows how to write are regenerated from what remains; any other
        file in the exports folder cannot be checked, so it is removed."""
        visitor = self.check_visitor(visitor)
        counts = self.runtime.store.delete_session_data(visitor.id)
        regenerated, removed = self.refresh_exports()
        parts = ", ".join(f"{v} {k}" for k, v in counts.items())
        return f"Deleted: {parts}. Exports rewritten: {regenerated}, removed: {removed}. {push_after_deletion()}".strip()

    def refresh_exports(self) -> tuple[int, int]:
        folder = self.runtime.settings.exports_dir
        if not folder.is_dir():
            return 0, 0
        regenerated = removed = 0
        for path in sorted(folder.iterdir()):
            if not path.is_file():
                continue
            kind, _, suffix = path.name.removesuffix(".jsonl").partition("-")
            if path.suffix == ".jsonl" and kind in EXPORT_WRITERS and suffix in ("", "with-sessions"):
                EXPORT_WRITERS[kind](self.runtime.store, path, include_session_ids=bool(suffix))
                regenerated += 1
            else:
                path.unlink()
                removed += 1
        return regenerated, removed


__all__ = ["ChatState", "Handlers", "PairState", "StoreError", "UserError"]

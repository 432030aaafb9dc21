"""Plain functions behind every UI event, callable from tests without a browser.

Each handler validates its input first and raises :class:`UserError` with a message meant
for the visitor; nothing is written in that case. Votes are committed to SQLite before a
handler returns, so "recorded" in the UI always means recorded on disk.
"""

from __future__ import annotations

import random
import re
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rlhf_demo.runtime import Runtime
from rlhf_demo.serving import Generation, strip_control
from rlhf_demo.store import StoreError

FENCE_CLOSE = "\n```````"  # closes any open ``` fence (a closing fence may be longer); rare in answers
VERSION_TAG = re.compile(r"(?:\n```````)?\n\n<sub>written by adapter [^<]*</sub>$")
_FENCE_LINE = re.compile(r"^ {0,3}```", re.MULTILINE)
OUTCOMES = {"A is better": "A", "B is better": "B", "Tie": "tie", "Both bad": "both_bad"}
SOURCES = {"Two samples of the active policy": "two_samples", "Active vs previous version": "two_versions"}


class UserError(ValueError):
    """Bad input from a visitor: shown to them as is, nothing written."""


@dataclass
class ChatState:
    """One browser session's chat: clean messages for the model, response id per answer."""

    conversation_id: str | None = None
    response_ids: dict[int, str] = field(default_factory=dict)  # chat index -> response id


@dataclass
class PairState:
    """The Compare tab's current pair; versions are revealed only after the vote."""

    response_ids: tuple[str, str] | None = None
    versions: tuple[str, str] | None = None
    source: str = "two_samples"
    voted: bool = False


def tag_version(text: str, version: str) -> str:
    """The answer plus which version wrote it; an answer cut off inside a code block gets the
    block closed first, or the tag would show as raw text inside it."""
    if len(_FENCE_LINE.findall(text)) % 2:
        text += FENCE_CLOSE
    return f"{text}\n\n<sub>written by adapter {version}</sub>"


def clean_history(chat: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The model sees the conversation without our display-only version tags."""
    return [{"role": m["role"], "content": VERSION_TAG.sub("", message_text(m["content"]))} for m in chat]


def message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # Gradio 6 may hand back [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


class RateLimiter:
    """At most ``limit`` events per session in any 60 s window (in memory, per process)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._events: dict[str, deque[float]] = defaultdict(deque)

    def check(self, session_id: str) -> None:
        now, window = time.monotonic(), self._events[session_id]
        while window and now - window[0] > 60:
            window.popleft()
        if len(window) >= self.limit:
            raise UserError(f"Too many votes: at most {self.limit} per minute. Please wait a moment.")
        window.append(now)


class Handlers:
    """The UI's verbs over one :class:`Runtime`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.limits = runtime.settings.limits
        self.votes = RateLimiter(self.limits.votes_per_minute)

    # ----- validation -------------------------------------------------------------------
    def check_message(self, message: Any) -> str:
        if not isinstance(message, str):
            raise UserError("A message must be text.")
        if "\x00" in message:
            raise UserError("The message contains a NUL byte; please send plain text.")
        text = strip_control(message).strip()
        if not text:
            raise UserError("The message is empty.")
        if len(text) > self.limits.max_message_chars:
            raise UserError(f"The message is too long: {len(text)} characters, the limit is {self.limits.max_message_chars}.")
        return text

    @staticmethod
    def check_session(session_id: Any) -> str:
        if not isinstance(session_id, str) or not session_id.strip():
            raise UserError("No session: reload the page.")
        return session_id

    # ----- chat -------------------------------------------------------------------------
    def chat(
        self,
        session_id: str,
        message: Any,
        chat: list[dict[str, Any]],
        state: ChatState,
        temperature: float | None = None,
        top_p: float | None = None,
        max_new_tokens: int | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """Stream an answer into the chat; record it (with its exact prompt) when done."""
        session_id = self.check_session(session_id)
        text = self.check_message(message)
        chat = list(chat or [])
        if sum(1 for m in chat if m["role"] == "user") >= self.limits.max_turns:
            raise UserError(f"This conversation reached {self.limits.max_turns} turns; press Clear to start a new one.")
        chat.append({"role": "user", "content": text})
        yield chat
        yield from self._answer(session_id, chat, state, temperature, top_p, max_new_tokens)

    def retry(self, session_id: str, chat: list[dict[str, Any]], state: ChatState, index: int, **sampling: Any) -> Iterator[list[dict[str, Any]]]:
        """Drop the answer at ``index`` (and what followed) and answer the same question again."""
        session_id = self.check_session(session_id)
        chat = list(chat or [])[: max(0, int(index))]
        if not chat or chat[-1]["role"] != "user":
            raise UserError("Nothing to retry.")
        self._forget_from(state, len(chat))
        yield chat
        yield from self._answer(session_id, chat, state, **sampling)

    def undo(self, chat: list[dict[str, Any]], state: ChatState, index: int) -> tuple[list[dict[str, Any]], str]:
        """Remove the last exchange from the chat; its stored answer and votes stay (the data is kept)."""
        chat = list(chat or [])
        cut = max(0, int(index))
        if cut < len(chat) and chat[cut]["role"] == "assistant":
            cut -= 1  # undoing an answer also removes the question that led to it
        self._forget_from(state, max(cut, 0))
        removed = chat[max(cut, 0) :]
        last_user = next((message_text(m["content"]) for m in removed if m["role"] == "user"), "")
        return chat[: max(cut, 0)], last_user

    @staticmethod
    def clear(state: ChatState) -> tuple[list[dict[str, Any]], ChatState]:
        return [], ChatState()

    @staticmethod
    def _forget_from(state: ChatState, index: int) -> None:
        for key in [k for k in state.response_ids if k >= index]:
            del state.response_ids[key]

    def _answer(
        self,
        session_id: str,
        chat: list[dict[str, Any]],
        state: ChatState,
        temperature: float | None = None,
        top_p: float | None = None,
        max_new_tokens: int | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        history = clean_history(chat)
        result: Generation | None = None
        for item in self.runtime.server.stream(history, None, temperature, top_p, max_new_tokens):
            if isinstance(item, Generation):
                result = item
            else:
                yield [*chat, {"role": "assistant", "content": item}]
        assert result is not None
        if state.conversation_id is None:
            state.conversation_id = self.runtime.store.new_conversation(session_id)
        response_id = self._log(session_id, result, state.conversation_id)
        state.response_ids[len(chat)] = response_id
        yield [*chat, {"role": "assistant", "content": tag_version(result.text, result.version)}]

    def _log(self, session_id: str, result: Generation, conversation_id: str | None) -> str:
        return self.runtime.store.log_response(
            session_id=session_id,
            prompt=result.prompt,
            text=result.text,
            adapter_version=result.version,
            sampling={"temperature": result.sampling.temperature, "top_p": result.sampling.top_p, "max_new_tokens": result.sampling.max_new_tokens},
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            latency_s=result.latency_s,
            finish_reason=result.finish_reason,
            conversation_id=conversation_id,
        )

    def like(self, session_id: str, state: ChatState, index: Any, liked: Any) -> str:
        """👍/👎 on the answer at chat ``index``; clicking the same thumb again removes the vote."""
        session_id = self.check_session(session_id)
        if isinstance(index, (list, tuple)):
            index = index[0]
        if not isinstance(index, int) or index not in state.response_ids:
            raise UserError("That message is not a rated answer (wait until it has finished).")
        value = {True: 1, False: -1, "Like": 1, "Dislike": -1}.get(liked) if isinstance(liked, (bool, str)) else None
        self.votes.check(session_id)
        self.runtime.store.rate(session_id, state.response_ids[index], value)
        return {1: "👍 recorded.", -1: "👎 recorded.", None: "Vote removed."}[value]

    # ----- compare ----------------------------------------------------------------------
    def compare(self, session_id: str, message: Any, source_label: str, **sampling: Any) -> tuple[str, str, PairState]:
        """Two answers to one prompt from one batched call; which version wrote which stays hidden."""
        session_id = self.check_session(session_id)
        text = self.check_message(message)
        source = SOURCES.get(source_label, source_label)
        if source not in SOURCES.values():
            raise UserError(f"Unknown comparison source {source_label!r}.")
        active = self.runtime.server.active
        if source == "two_versions":
            previous = self.previous_version(active)
            if previous is None:
                raise UserError("There is no previous version yet: compare two samples instead.")
            versions = [active, previous]
            random.shuffle(versions)  # blind: position must not reveal the version
        else:
            versions = [active, active]
        results = self.runtime.server.generate_pair([{"role": "user", "content": text}], (versions[0], versions[1]), **sampling)
        ids = tuple(self._log(session_id, r, None) for r in results)
        state = PairState(response_ids=(ids[0], ids[1]), versions=(versions[0], versions[1]), source=source)
        return results[0].text, results[1].text, state

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

    def vote_pair(self, session_id: str, state: PairState, outcome_label: str) -> tuple[str, PairState]:
        """Record an A/B vote, then reveal which version wrote which answer."""
        session_id = self.check_session(session_id)
        outcome = OUTCOMES.get(outcome_label, outcome_label)
        if outcome not in OUTCOMES.values():
            raise UserError(f"Unknown outcome {outcome_label!r}.")
        if state.response_ids is None or state.versions is None:
            raise UserError("Generate a pair first.")
        if state.voted:
            raise UserError("You already voted on this pair; generate a new one.")
        self.votes.check(session_id)
        a, b = state.response_ids
        self.runtime.store.prefer(session_id=session_id, response_a_id=a, response_b_id=b, outcome=outcome, source=state.source)
        state.voted = True
        return f"Vote recorded. A was written by **{state.versions[0]}**, B by **{state.versions[1]}**.", state

    # ----- data -------------------------------------------------------------------------
    def counts_markdown(self) -> str:
        counts = self.runtime.store.counts()
        per_session = self.runtime.store.votes_per_session()
        top = ", ".join(str(n) for n in per_session[:10]) or "none yet"
        return (
            f"**Responses** {counts['responses']} · **👍** {counts['thumbs_up']} · **👎** {counts['thumbs_down']} · "
            f"**A/B pairs** {counts['preferences']} · **ties** {counts['ties']} · **both bad** {counts['both_bad']} · "
            f"**voting sessions** {counts['sessions']}  \nVotes per session (largest first, no identities): {top}"
        )

    def model_markdown(self) -> str:
        d = self.runtime.describe()
        warning = "\n\n⚠️ **This is the tiny random test model: its answers are noise.**" if self.runtime.loaded.source.is_test_model else ""
        return f"**Model:** {d['model']}  \n**Active adapter:** {d['active_adapter']}  \n**Data directory:** `{d['data_dir']}`{warning}"

    def export(self, kind: str, include_session_ids: bool = False, admin_token: str = "") -> str:
        """Write a TRL-format JSONL into the exports folder and return its path."""
        from rlhf_demo.store import export_preferences, export_unpaired

        if include_session_ids:
            self.require_admin(admin_token)
        writers = {"preferences": export_preferences, "unpaired": export_unpaired}
        if kind not in writers:
            raise UserError(f"Unknown export {kind!r}.")
        folder = self.runtime.settings.exports_dir
        folder.mkdir(parents=True, exist_ok=True)
        suffix = "-with-sessions" if include_session_ids else ""
        path = folder / f"{kind}{suffix}.jsonl"
        writers[kind](self.runtime.store, path, include_session_ids=include_session_ids)
        return str(path)

    def require_admin(self, token: Any) -> None:
        expected = self.runtime.settings.admin_token
        import hmac

        if not expected or not isinstance(token, str) or not hmac.compare_digest(token.encode(), expected.encode()):
            raise UserError("This action needs the admin token.")

    # ----- admin (each needs the token; the UI renders these only when one is configured) ---
    def rollback(self, version: Any, admin_token: str) -> str:
        """Pin the served version to any published one (the server picks it up on its next poll)."""
        self.require_admin(admin_token)
        if not isinstance(version, str) or not version:
            raise UserError("Choose a version.")
        self.runtime.store.activate(version)
        served = self.runtime.sync_registry()
        return f"Now serving {served}."

    def reset_to_base(self, admin_token: str) -> str:
        """Serve the base model without any adapter; the versions stay for a later rollback."""
        self.require_admin(admin_token)
        active = self.runtime.store.active_version()
        if active is not None:
            self.runtime.store.set_version_status(active, "retired")
        return f"Now serving {self.runtime.sync_registry()}."

    def train_now(self, admin_token: str) -> str:
        from rlhf_demo.worker.status import request_training

        self.require_admin(admin_token)
        request_training(self.runtime.settings.worker_dir)
        return "Training requested: the worker starts a cycle on its next poll."

    def delete_my_data(self, session_id: str) -> str:
        counts = self.runtime.store.delete_session_data(self.check_session(session_id))
        return "Deleted: " + ", ".join(f"{v} {k}" for k, v in counts.items())


__all__ = ["ChatState", "Handlers", "PairState", "StoreError", "UserError"]

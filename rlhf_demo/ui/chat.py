"""The Chat tab: a chatbot with 👍/👎, Retry, Undo, Stop and Clear, wired to :class:`ChatHandlers`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from rlhf_demo.config import SamplingBounds
from rlhf_demo.ui import reasons
from rlhf_demo.ui.events import PRIVATE, friendly, visitor_of
from rlhf_demo.ui.handlers import ChatHandlers, ChatState, check_event

EXAMPLES = [
    "Explain what a reward model is, in two sentences.",
    "Write a Python function that reverses a string.",
    "Give me three tips for a good night's sleep.",
    "What is the capital of Australia?",
]


def display(chat: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The server's copy of a chat as the Chatbot's value. Text goes as a text part, which
    Gradio shows as is: a plain string would be dedented (``inspect.cleandoc``), losing the
    indentation of code and lists."""
    return [{"role": m["role"], "content": {"type": "text", "text": m["content"]}} for m in chat]


class ChatEvents:
    """The Chat tab's events as the browser sends them. Event data arrives as the base
    ``gr.EventData`` and is validated here: the typed classes (LikeData, ...) fail inside
    Gradio on a missing or odd payload."""

    def __init__(self, handlers: ChatHandlers) -> None:
        self.h = handlers

    def _visitor(self, request: gr.Request | None) -> Any:
        return visitor_of(self.h.runtime, request)

    def on_load(self, request: gr.Request) -> tuple[Any, ChatState]:
        """A page load (or reload): the visitor's last chat, as the server keeps it."""
        state = self.h.restore(self._visitor(request))
        return display(state.messages), state

    @friendly
    def on_chat(self, msg: str, chat: list, state: ChatState, t: float, p: float, n: int, request: gr.Request) -> Iterator[Any]:
        visitor = self._visitor(request)
        for value in self.h.chat(visitor, msg, chat, state, t, p, n):
            yield display(value), "", state
        self.h.remember(visitor, state)

    @friendly
    def on_retry(
        self, chat: list, state: ChatState, t: float, p: float, n: int, data: gr.EventData, request: gr.Request
    ) -> Iterator[Any]:
        index = check_event(data, ("index",))["index"]
        visitor = self._visitor(request)
        for value in self.h.retry(visitor, chat, state, index, temperature=t, top_p=p, max_new_tokens=n):
            yield display(value), state
        self.h.remember(visitor, state)

    @friendly
    def on_edit(
        self, chat: list, state: ChatState, t: float, p: float, n: int, data: gr.EventData, request: gr.Request
    ) -> Iterator[Any]:
        """An edited question: answered anew as a branch of the conversation (the old one stays recorded)."""
        payload = check_event(data, ("index", "value"))
        visitor = self._visitor(request)
        for value in self.h.retry(
            visitor, chat, state, payload["index"], payload["value"], temperature=t, top_p=p, max_new_tokens=n
        ):
            yield display(value), state
        self.h.remember(visitor, state)

    @friendly
    def on_undo(self, chat: list, state: ChatState, data: gr.EventData, request: gr.Request) -> tuple[Any, ...]:
        new_chat, last = self.h.undo(chat, state, check_event(data, ("index",))["index"])
        self.h.remember(self._visitor(request), state)
        return display(new_chat), last, state

    @friendly
    def on_like(self, state: ChatState, data: gr.EventData, request: gr.Request) -> tuple[Any, ...]:
        payload = check_event(data, ("index",))
        said = self.h.like(self._visitor(request), state, payload["index"], payload.get("liked", True))
        return said, state, *reasons.shown(state.disliked is not None)  # reasons after a 👎

    @friendly
    def on_thumb_reasons(self, state: ChatState, tags: Any, comment: Any, request: gr.Request) -> str:
        return self.h.thumb_reasons(self._visitor(request), state, tags, comment)

    @friendly
    def on_stop(self, state: ChatState) -> str:
        return self.h.stop(state)

    def on_clear(self, state: ChatState, request: gr.Request) -> tuple[Any, ...]:
        chat, fresh = self.h.clear(state)
        self.h.forget(self._visitor(request))
        return chat, fresh, *reasons.shown(False)

    @friendly
    def on_api_rate(self, state: ChatState, index: float, liked: bool, request: gr.Request) -> str:
        """The same vote for API clients (gradio_client cannot send LikeData): index + liked."""
        return self.h.rate_api(self._visitor(request), state, index, liked)  # no bool(): "Dislike" is truthy


def shown_again(state: ChatState, message: str) -> tuple[Any, str]:
    """After a failed event: the chat as the server has it, the box as it was. Gradio keeps an
    "Error" overlay on a failed event's outputs until their next update; it hid the chat and
    swallowed clicks on its thumbs. This is that update."""
    return display(state.messages if isinstance(state, ChatState) else []), message


def writing() -> tuple[Any, Any]:
    """Stop replaces Send while an answer streams."""
    return gr.Button(visible=False), gr.Button(visible=True)


def idle() -> tuple[Any, Any]:
    return gr.Button(visible=True), gr.Button(visible=False)


@dataclass
class ChatTab:
    tab: gr.Tab
    chatbot: gr.Chatbot
    state: gr.State


def sampling_sliders(bounds: SamplingBounds) -> tuple[gr.Slider, gr.Slider, gr.Slider]:
    """Temperature, top-p and max new tokens, in a folded "Settings" accordion."""
    with gr.Accordion("Settings", open=False):
        temperature = gr.Slider(
            bounds.min_temperature, bounds.max_temperature, bounds.temperature, step=0.05, label="Temperature (0 = greedy)"
        )
        top_p = gr.Slider(bounds.min_top_p, 1.0, bounds.top_p, step=0.05, label="Top-p")
        max_new = gr.Slider(1, bounds.max_max_new_tokens, bounds.max_new_tokens, step=1, label="Max new tokens")
    return temperature, top_p, max_new


def build_chat_tab(events: ChatEvents, guidelines: str, demo: gr.Blocks) -> ChatTab:
    """The Chat tab inside the current Blocks; each page load shows the visitor's last chat."""
    with gr.Tab("Chat") as tab:
        with gr.Accordion("Rater guidelines: what to reward", open=False, elem_id="chat-guidelines"):
            gr.Markdown(guidelines)
        state = gr.State(ChatState())
        chatbot = gr.Chatbot(label="Chat", height=460, feedback_options=("Like", "Dislike"), editable="user")
        with gr.Row():
            message = gr.Textbox(placeholder="Ask anything…", show_label=False, scale=5, max_lines=8)
            send = gr.Button("Send", variant="primary", scale=1)
            stop = gr.Button("Stop", variant="stop", scale=1, visible=False)
        gr.Examples(EXAMPLES, inputs=[message], label="Try one")
        vote_status = gr.Markdown(elem_id="chat-vote-status")
        why = reasons.reasons_panel("chat-reasons", "What was wrong with this answer? (optional)")
        temperature, top_p, max_new = sampling_sliders(events.h.runtime.settings.sampling)

        demo.load(events.on_load, None, [chatbot, state], **PRIVATE)
        chat_inputs = [message, chatbot, state, temperature, top_p, max_new]
        retry_inputs = [chatbot, state, temperature, top_p, max_new]
        for trigger, fn, inputs, outputs, api_name in (
            (send.click, events.on_chat, chat_inputs, [chatbot, message, state], "chat"),
            (message.submit, events.on_chat, chat_inputs, [chatbot, message, state], None),
            (chatbot.retry, events.on_retry, retry_inputs, [chatbot, state], None),
            (chatbot.edit, events.on_edit, retry_inputs, [chatbot, state], None),
        ):
            trigger(writing, None, [send, stop], queue=False, **PRIVATE)
            visibility = "public" if api_name else "private"
            answered = trigger(fn, inputs, outputs, api_name=api_name, api_visibility=visibility)
            # Gradio's `.then` does not follow a failed event: Send must come back either way.
            for after in (answered.then, answered.failure):
                after(idle, None, [send, stop], queue=False, **PRIVATE)
            answered.failure(shown_again, [state, message], [chatbot, message], queue=False, **PRIVATE)
        # Stop: the answer ends at its next token and is kept (recorded, rateable); not Gradio's
        # `cancels`, which would leave a half answer the server has no record of.
        stop.click(events.on_stop, [state], [vote_status], queue=False, **PRIVATE)
        chatbot.undo(events.on_undo, [chatbot, state], [chatbot, message, state], **PRIVATE)
        # multiple: a thumb clicked again while the first click is still on its way (a quick 👍
        # then un-👍) must reach the server with its own data, in order (one vote at a time: a
        # vote is one quick write). Gradio's default drops it; "always_last" replays the first
        # click's data.
        chatbot.like(
            events.on_like, [state], [vote_status, state, *why.outputs], trigger_mode="multiple", concurrency_limit=1, **PRIVATE
        )
        why.send.click(events.on_thumb_reasons, [state, why.tags, why.comment], [why.status], **PRIVATE)
        # The Chatbot's own trash button is the one Clear: it empties the chat in the browser,
        # this starts a new conversation on the server.
        chatbot.clear(events.on_clear, [state], [chatbot, state, *why.outputs], **PRIVATE)

        api_index = gr.Number(visible=False, precision=0)
        api_liked = gr.Checkbox(visible=False)
        api_rate = gr.Button(visible=False)
        api_rate.click(events.on_api_rate, [state, api_index, api_liked], [vote_status], api_name="rate")
    return ChatTab(tab, chatbot, state)

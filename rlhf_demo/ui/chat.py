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


class ChatEvents:
    """The Chat tab's events as the browser sends them. Event data arrives as the base
    ``gr.EventData`` and is validated here: the typed classes (LikeData, ...) fail inside
    Gradio on a missing or odd payload."""

    def __init__(self, handlers: ChatHandlers) -> None:
        self.h = handlers

    def _visitor(self, request: gr.Request | None) -> Any:
        return visitor_of(self.h.runtime, request)

    @friendly
    def on_chat(self, msg: str, chat: list, state: ChatState, t: float, p: float, n: int, request: gr.Request) -> Iterator[Any]:
        for value in self.h.chat(self._visitor(request), msg, chat, state, t, p, n):
            yield value, "", state

    @friendly
    def on_retry(self, chat: list, state: ChatState, t: float, p: float, n: int, data: gr.EventData, request: gr.Request) -> Iterator[Any]:
        index = check_event(data, ("index",))["index"]
        for value in self.h.retry(self._visitor(request), chat, state, index, temperature=t, top_p=p, max_new_tokens=n):
            yield value, state

    @friendly
    def on_undo(self, chat: list, state: ChatState, data: gr.EventData) -> tuple[Any, ...]:
        new_chat, last = self.h.undo(chat, state, check_event(data, ("index",))["index"])
        return new_chat, last, state

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

    def on_clear(self, state: ChatState) -> tuple[Any, ...]:
        return *self.h.clear(state), *reasons.shown(False)

    @friendly
    def on_api_rate(self, state: ChatState, index: float, liked: bool, request: gr.Request) -> str:
        """The same vote for API clients (gradio_client cannot send LikeData): index + liked."""
        return self.h.rate_api(self._visitor(request), state, index, liked)  # no bool(): "Dislike" is truthy


def writing() -> tuple[Any, Any]:
    """Stop replaces Send while an answer streams."""
    return gr.Button(visible=False), gr.Button(visible=True)


def idle() -> tuple[Any, Any]:
    return gr.Button(visible=True), gr.Button(visible=False)


@dataclass
class ChatTab:
    tab: gr.Tab
    temperature: gr.Slider
    top_p: gr.Slider
    max_new: gr.Slider


def sampling_sliders(bounds: SamplingBounds) -> tuple[gr.Slider, gr.Slider, gr.Slider]:
    """Temperature, top-p and max new tokens, in a folded "Settings" accordion."""
    with gr.Accordion("Settings", open=False):
        temperature = gr.Slider(bounds.min_temperature, bounds.max_temperature, bounds.temperature, step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(bounds.min_top_p, 1.0, bounds.top_p, step=0.05, label="Top-p")
        max_new = gr.Slider(1, bounds.max_max_new_tokens, bounds.max_new_tokens, step=1, label="Max new tokens")
    return temperature, top_p, max_new


def build_chat_tab(events: ChatEvents, guidelines: str) -> ChatTab:
    """The Chat tab inside the current Blocks."""
    with gr.Tab("Chat") as tab:
        with gr.Accordion("Rater guidelines: what to reward", open=False, elem_id="chat-guidelines"):
            gr.Markdown(guidelines)
        state = gr.State(ChatState())
        chatbot = gr.Chatbot(label="Chat", height=460, feedback_options=("Like", "Dislike"))
        with gr.Row():
            message = gr.Textbox(placeholder="Ask anything…", show_label=False, scale=5, max_lines=8)
            send = gr.Button("Send", variant="primary", scale=1)
            stop = gr.Button("Stop", variant="stop", scale=1, visible=False)
        vote_status = gr.Markdown(elem_id="chat-vote-status")
        why = reasons.reasons_panel("chat-reasons", "What was wrong with this answer? (optional)")
        temperature, top_p, max_new = sampling_sliders(events.h.runtime.settings.sampling)

        chat_inputs = [message, chatbot, state, temperature, top_p, max_new]
        retry_inputs = [chatbot, state, temperature, top_p, max_new]
        for trigger, fn, inputs, outputs, api_name in (
            (send.click, events.on_chat, chat_inputs, [chatbot, message, state], "chat"),
            (message.submit, events.on_chat, chat_inputs, [chatbot, message, state], None),
            (chatbot.retry, events.on_retry, retry_inputs, [chatbot, state], None),
        ):
            trigger(writing, None, [send, stop], queue=False, **PRIVATE)
            visibility = "public" if api_name else "private"
            trigger(fn, inputs, outputs, api_name=api_name, api_visibility=visibility).then(idle, None, [send, stop], queue=False, **PRIVATE)
        # Stop: the answer ends at its next token and is kept (recorded, rateable); not Gradio's
        # `cancels`, which would leave a half answer the server has no record of.
        stop.click(events.on_stop, [state], [vote_status], queue=False, **PRIVATE)
        chatbot.undo(events.on_undo, [chatbot, state], [chatbot, message, state], **PRIVATE)
        chatbot.like(events.on_like, [state], [vote_status, state, *why.outputs], **PRIVATE)
        why.send.click(events.on_thumb_reasons, [state, why.tags, why.comment], [why.status], **PRIVATE)
        # The Chatbot's own trash button is the one Clear: it empties the chat in the browser,
        # this starts a new conversation on the server.
        chatbot.clear(events.on_clear, [state], [chatbot, state, *why.outputs], **PRIVATE)

        api_index = gr.Number(visible=False, precision=0)
        api_liked = gr.Checkbox(visible=False)
        api_rate = gr.Button(visible=False)
        api_rate.click(events.on_api_rate, [state, api_index, api_liked], [vote_status], api_name="rate")
    return ChatTab(tab, temperature, top_p, max_new)

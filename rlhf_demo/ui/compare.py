"""The Compare tab: two blind answers side by side, an A/B vote, keyboard shortcuts, a new round."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from rlhf_demo.ui import reasons
from rlhf_demo.ui.chat import sampling_sliders
from rlhf_demo.ui.events import PRIVATE, friendly, visitor_of
from rlhf_demo.ui.handlers import SOURCES, VOTE_LABELS, CompareHandlers, PairState

# Keyboard shortcuts on the Compare tab (A, B, T = tie, X = both bad, N = new round), ignored while
# typing; each presses the visible, enabled button with that id, so the server's checks apply.
KEYBOARD_JS = """
() => {
  const keys = {a: "vote-A", b: "vote-B", t: "vote-tie", x: "vote-both_bad", n: "compare-new-round"};
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey || target.closest("input, textarea, select, [contenteditable]")) return;
    const button = document.getElementById(keys[event.key.toLowerCase()]);
    if (button && button.offsetParent !== null && !button.disabled) { event.preventDefault(); button.click(); }
  });
}
"""
VOTE_BUTTONS = len(VOTE_LABELS)


class CompareEvents:
    """The Compare tab's events as the browser sends them."""

    def __init__(self, handlers: CompareHandlers) -> None:
        self.h = handlers

    @friendly
    def on_compare(self, text: str, src: str, t: float, p: float, n: int, request: gr.Request) -> Iterator[Any]:
        visitor = visitor_of(self.h.runtime, request)
        for a, b, state in self.h.compare_stream(visitor, text, src, temperature=t, top_p=p, max_new_tokens=n):
            cursor = " ▌" if state.generating else ""
            yield (
                f"**A**\n\n{a}{cursor}",
                f"**B**\n\n{b}{cursor}",
                state,
                "Writing both answers…" if state.generating else "Which answer is better?",
            )

    def on_vote(self, label: str) -> Callable[..., tuple[Any, ...]]:
        """The event of the vote button ``label`` (one endpoint per outcome for API clients)."""

        @friendly
        def vote(state: PairState, request: gr.Request) -> tuple[Any, ...]:
            return self.h.vote_pair(visitor_of(self.h.runtime, request), state, label)

        return vote

    @friendly
    def on_pair_reasons(self, state: PairState, tags: Any, comment: Any, request: gr.Request) -> str:
        return self.h.pair_reasons(visitor_of(self.h.runtime, request), state, tags, comment)

    @friendly
    def on_stop(self, state: PairState) -> None:
        self.h.stop_pair(state)

    def on_new_round(self) -> tuple[Any, ...]:
        return "", "", "", "", self.h.new_round(), *locked()


def vote_controls(state: PairState) -> list[Any]:
    """Votes open once both answers are recorded and lock after the vote (as in Chatbot
    Arena); "New round" and the "why" panel appear after the vote. Display only: the handler
    checks again."""
    ready = isinstance(state, PairState) and state.response_ids is not None and not state.generating
    voted = bool(ready and state.voted)
    return [
        *(gr.Button(interactive=ready and not voted) for _ in range(VOTE_BUTTONS)),
        gr.Button(visible=voted),
        *reasons.shown(voted),
    ]


def locked() -> list[Any]:
    return [*(gr.Button(interactive=False) for _ in range(VOTE_BUTTONS)), gr.Button(visible=False), *reasons.shown(False)]


def writing() -> tuple[Any, Any]:
    """Stop replaces Generate while the answers stream."""
    return gr.Button(visible=False), gr.Button(visible=True)


def idle() -> tuple[Any, Any]:
    return gr.Button(visible=True), gr.Button(visible=False)


def build_compare_tab(events: CompareEvents, guidelines: str) -> gr.Tab:
    """The Compare tab inside the current Blocks, with its own sampling settings."""
    with gr.Tab("Compare") as tab:
        state = gr.State(PairState())
        gr.Markdown(
            "Two anonymous answers to your prompt, side by side. Vote for the better one; who wrote each is revealed after your vote. "
            "Keys: **A**, **B**, **T** (tie), **X** (both bad), **N** (new round)."
        )
        with gr.Accordion("Rater guidelines: what to reward", open=False, elem_id="compare-guidelines"):
            gr.Markdown(guidelines)
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", scale=4)
            source = gr.Radio(list(SOURCES), value=next(iter(SOURCES)), label="Compare", scale=2)
        with gr.Row():
            generate = gr.Button("Generate two answers", variant="primary")
            stop = gr.Button("Stop", variant="stop", visible=False, elem_id="compare-stop")
        with gr.Row():
            answer_a = gr.Markdown(container=True, elem_id="compare-answer-a")
            answer_b = gr.Markdown(container=True, elem_id="compare-answer-b")
        with gr.Row():
            vote_buttons = [
                gr.Button(label, interactive=False, elem_id=f"vote-{outcome}") for label, outcome in VOTE_LABELS.items()
            ]
        reveal = gr.Markdown(elem_id="compare-reveal")
        why = reasons.reasons_panel("compare-reasons", "What was wrong with the worse answer (or both)? (optional)")
        new_round = gr.Button("New round", visible=False, elem_id="compare-new-round")
        sampling = sampling_sliders(events.h.runtime.settings.sampling)

        controls = [*vote_buttons, new_round, *why.outputs]
        for trigger, api_name in ((generate.click, "compare"), (prompt.submit, None)):
            trigger(locked, None, controls, queue=False, **PRIVATE)
            trigger(writing, None, [generate, stop], queue=False, **PRIVATE)
            visibility = "public" if api_name else "private"
            answered = trigger(
                events.on_compare,
                [prompt, source, *sampling],
                [answer_a, answer_b, state, reveal],
                api_name=api_name,
                api_visibility=visibility,
            )
            # Gradio's `.then` does not follow a failed event: Generate must come back either way.
            for after in (answered.then, answered.failure):
                after(idle, None, [generate, stop], queue=False, **PRIVATE)
            answered.then(vote_controls, [state], controls, queue=False, **PRIVATE)
        stop.click(events.on_stop, [state], None, queue=False, **PRIVATE)
        for button in vote_buttons:
            button.click(
                events.on_vote(button.value), [state], [reveal, state], api_name=f"vote_{VOTE_LABELS[button.value]}"
            ).then(vote_controls, [state], controls, queue=False, **PRIVATE)
        why.send.click(events.on_pair_reasons, [state, why.tags, why.comment], [why.status], **PRIVATE)
        new_round.click(events.on_new_round, None, [prompt, answer_a, answer_b, reveal, state, *controls], queue=False, **PRIVATE)
    return tab

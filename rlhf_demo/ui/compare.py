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


def side_markdown(side: str, answer: str, state: PairState, cursor: str = "") -> str:
    """One side of the pair as shown: its conversation so far (after a "continue both"), then the
    answer being voted on."""
    parts = [f"**{side}**"]
    earlier = state.earlier[0 if side == "A" else 1]
    if earlier:
        for m in [*earlier, {"role": "user", "content": state.question}]:
            said = m["content"]
            parts.append("\n".join(f"> {line}" for line in f"**You:** {said}".splitlines()) if m["role"] == "user" else said)
    parts.append(f"{answer}{cursor}")
    # Gradio's Markdown dedents its value (inspect.cleandoc) by the least indentation of the
    # lines after the first: with the header second, that is zero, and indented code stays code.
    return "\n" + "\n\n".join(parts)


def shown_pair(a: str, b: str, state: PairState) -> tuple[str, str, PairState, str]:
    """Both sides, the state and the line under them while the answers stream; once they are
    recorded the line invites no vote yet: :func:`answers_done` does, as the votes open."""
    cursor = " ▌" if state.generating else ""
    said = "Writing both answers…" if state.generating else ""
    return side_markdown("A", a, state, cursor), side_markdown("B", b, state, cursor), state, said


class CompareEvents:
    """The Compare tab's events as the browser sends them."""

    def __init__(self, handlers: CompareHandlers) -> None:
        self.h = handlers

    @friendly
    def on_compare(self, text: str, src: str, t: float, p: float, n: int, request: gr.Request) -> Iterator[Any]:
        visitor = visitor_of(self.h.runtime, request)
        for a, b, state in self.h.compare_stream(visitor, text, src, temperature=t, top_p=p, max_new_tokens=n):
            yield shown_pair(a, b, state)

    @friendly
    def on_continue(self, text: str, state: PairState, t: float, p: float, n: int, request: gr.Request) -> Iterator[Any]:
        """A follow-up both sides answer, each in its own conversation; the follow-up box empties."""
        visitor = visitor_of(self.h.runtime, request)
        for a, b, pair in self.h.continue_stream(visitor, text, state, temperature=t, top_p=p, max_new_tokens=n):
            yield *shown_pair(a, b, pair), ""

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
        return "", "", "", "", "", self.h.new_round(), *locked()


def recorded(state: PairState) -> bool:
    """Both answers are in the store: the pair can be voted on (once) and continued."""
    return isinstance(state, PairState) and state.response_ids is not None and not state.generating


def vote_controls(state: PairState) -> list[Any]:
    """Votes open once both answers are recorded and lock after the vote (as in Chatbot
    Arena); "New round" and the "why" panel appear after the vote, the follow-up for both
    sides as soon as the pair is recorded. Display only: the handler checks again."""
    ready = recorded(state)
    voted = bool(ready and state.voted)
    return [
        *(gr.Button(interactive=ready and not voted) for _ in range(VOTE_BUTTONS)),
        gr.Button(visible=voted),
        gr.Row(visible=ready),
        *reasons.shown(voted),
    ]


def answers_done(state: PairState) -> list[Any]:
    """The controls after the answers, and the line that asks for a vote in the same update:
    a visitor who presses a key on reading it finds the votes open."""
    ask = recorded(state) and not state.voted
    return [*vote_controls(state), "Which answer is better?" if ask else gr.update()]


def unchanged(*values: Any) -> tuple[Any, ...]:
    return values


def locked() -> list[Any]:
    return [
        *(gr.Button(interactive=False) for _ in range(VOTE_BUTTONS)),
        gr.Button(visible=False),
        gr.Row(visible=False),
        *reasons.shown(False),
    ]


def writing() -> tuple[Any, Any]:
    """Stop replaces Generate while the answers stream."""
    return gr.Button(visible=False), gr.Button(visible=True)


def idle() -> tuple[Any, Any]:
    return gr.Button(visible=True), gr.Button(visible=False)


def wire_answers(
    triggers: list[Any], fn: Any, inputs: list[Any], outputs: list[Any], buttons: list[Any], controls: list[Any], api_name: str
) -> None:
    """Each trigger locks the votes, swaps ``buttons`` (start, Stop) while ``fn`` streams, and
    shows the controls that fit the state afterwards. The first trigger (a button) is the API
    endpoint ``api_name``."""
    state, line = outputs[2], outputs[3]
    shown = [o for o in outputs if o is not state]
    for trigger, name in zip(triggers, (api_name, None), strict=True):
        trigger(locked, None, controls, queue=False, **PRIVATE)
        trigger(writing, None, buttons, queue=False, **PRIVATE)
        answered = trigger(fn, inputs, outputs, api_name=name, api_visibility="public" if name else "private")
        # Gradio's `.then` does not follow a failed event: the buttons and the controls of the
        # pair still shown must come back either way.
        for after in (answered.then, answered.failure):
            after(idle, None, buttons, queue=False, **PRIVATE)
            after(answers_done, [state], [*controls, line], queue=False, **PRIVATE)
        # Gradio keeps an "Error" overlay on a failed event's outputs until their next update; it
        # hid the pair and its votes. Showing the same values again is that update.
        answered.failure(unchanged, shown, shown, queue=False, **PRIVATE)


def build_compare_tab(events: CompareEvents, guidelines: str) -> gr.Tab:
    """The Compare tab inside the current Blocks, with its own sampling settings."""
    with gr.Tab("Compare") as tab:
        state = gr.State(PairState())
        gr.Markdown(
            "Two anonymous answers to your prompt, side by side. Vote for the better one; who wrote each is revealed after your vote. "
            "Then ask both a follow-up: each side goes on from its own answers. "
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
        with gr.Row(visible=False, elem_id="compare-continue-row") as followup_row:
            followup = gr.Textbox(label="Follow-up for both", placeholder="Ask A and B the same next question…", scale=4)
            continue_both = gr.Button("Continue both", scale=1, elem_id="compare-continue")
        why = reasons.reasons_panel("compare-reasons", "What was wrong with the worse answer (or both)? (optional)")
        new_round = gr.Button("New round", visible=False, elem_id="compare-new-round")
        sampling = sampling_sliders(events.h.runtime.settings.sampling)

        controls = [*vote_buttons, new_round, followup_row, *why.outputs]
        shown = [answer_a, answer_b, state, reveal]
        wire_answers(
            [generate.click, prompt.submit],
            events.on_compare,
            [prompt, source, *sampling],
            shown,
            [generate, stop],
            controls,
            "compare",
        )
        wire_answers(
            [continue_both.click, followup.submit],
            events.on_continue,
            [followup, state, *sampling],
            [*shown, followup],
            [generate, stop],
            controls,
            "continue_both",
        )
        stop.click(events.on_stop, [state], None, queue=False, **PRIVATE)
        for button in vote_buttons:
            button.click(
                events.on_vote(button.value), [state], [reveal, state], api_name=f"vote_{VOTE_LABELS[button.value]}"
            ).then(vote_controls, [state], controls, queue=False, **PRIVATE)
        why.send.click(events.on_pair_reasons, [state, why.tags, why.comment], [why.status], **PRIVATE)
        new_round.click(
            events.on_new_round, None, [prompt, followup, answer_a, answer_b, reveal, state, *controls], queue=False, **PRIVATE
        )
    return tab

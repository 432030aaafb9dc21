"""The optional "why" after a 👎 or an A/B vote: reason tags from a fixed list and a short
comment, in a panel that appears after the vote (the store validates what arrives)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from rlhf_demo.store.validate import MAX_COMMENT_CHARS, REASON_TAGS


@dataclass
class ReasonsPanel:
    box: gr.Column
    tags: gr.CheckboxGroup
    comment: gr.Textbox
    send: gr.Button
    status: gr.Markdown

    @property
    def outputs(self) -> list[Any]:
        """The components :func:`shown` updates, in its order."""
        return [self.box, self.tags, self.comment, self.status]


def shown(visible: bool) -> tuple[Any, Any, Any, Any]:
    """Updates for a panel's (box, tags, comment, status): shown empty after a vote, or hidden."""
    return gr.update(visible=visible), gr.CheckboxGroup(value=[]), gr.Textbox(value=""), ""


def reasons_panel(elem_id: str, question: str) -> ReasonsPanel:
    """Build the (hidden) panel inside the current Blocks context."""
    with gr.Column(visible=False, elem_id=elem_id) as box:
        tags = gr.CheckboxGroup(list(REASON_TAGS), label=question)
        with gr.Row():
            comment = gr.Textbox(
                label="Comment (optional)",
                max_length=MAX_COMMENT_CHARS,
                max_lines=3,
                scale=5,
                placeholder=f"Anything else? Up to {MAX_COMMENT_CHARS} characters.",
            )
            send = gr.Button("Send reasons", scale=1)
        status = gr.Markdown()
    return ReasonsPanel(box, tags, comment, send, status)

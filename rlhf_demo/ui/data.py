"""The Data tab: counts, TRL-format exports, "Delete my data" and (with a token) the admin actions."""

from __future__ import annotations

from typing import Any

import gradio as gr

from rlhf_demo.hub_sync import persistence_note
from rlhf_demo.ui.events import PRIVATE, friendly, visitor_of
from rlhf_demo.ui.handlers import ChatState, Handlers


class DataEvents:
    """The Data tab's events as the browser sends them."""

    def __init__(self, handlers: Handlers) -> None:
        self.h = handlers  # all of them: deleting a visitor's data also clears their saved chat

    @friendly
    def on_refresh(self, request: gr.Request) -> tuple[str, str, str]:
        return self.h.counts_markdown(), self.h.my_votes_markdown(visitor_of(self.h.runtime, request)), self.h.model_markdown()

    @friendly
    def export_preferences(self) -> str:
        return self.h.export("preferences")

    @friendly
    def export_unpaired(self) -> str:
        return self.h.export("unpaired")

    @friendly
    def raw_export(self, token: Any) -> str:
        return self.h.export("preferences", include_visitor_ids=True, admin_token=token)

    @friendly
    def on_delete(self, request: gr.Request) -> tuple[Any, ...]:
        """Delete, then clear the chat on screen: its answers are gone from the record."""
        visitor = visitor_of(self.h.runtime, request)
        said = self.h.delete_my_data(visitor)
        self.h.forget(visitor)
        return said, gr.Row(visible=False), self.h.counts_markdown(), None, [], ChatState()

    @friendly
    def rollback(self, version: Any, token: Any) -> str:
        return self.h.rollback(version, token)

    @friendly
    def reset_to_base(self, token: Any) -> str:
        return self.h.reset_to_base(token)

    @friendly
    def train_now(self, token: Any) -> str:
        return self.h.train_now(token)

    def versions(self) -> list[str]:
        """The versions an admin may pin (the gate's rejects are not among them)."""
        return [v["version"] for v in self.h.runtime.store.list_versions() if v["status"] != "rejected"]

    def version_choices(self) -> Any:
        return gr.Dropdown(choices=self.versions())


def ask_delete() -> tuple[Any, str]:
    return gr.Row(visible=True), ""


def hide_row() -> Any:
    return gr.Row(visible=False)


def build_data_tab(events: DataEvents, model_info: gr.Markdown, chat: list[Any], demo: gr.Blocks) -> gr.Tab:
    """The Data tab inside the current Blocks; ``model_info`` is the header it refreshes, and
    ``chat`` the Chat tab's chatbot and state, which "Delete my data" clears."""
    runtime = events.h.runtime
    with gr.Tab("Data") as tab:
        counts = gr.Markdown(elem_id="data-counts")
        mine = gr.Markdown(elem_id="data-my-votes")
        gr.Markdown(persistence_note(runtime.settings.db_path.resolve()))
        refresh = gr.Button("Refresh counts")
        with gr.Row():
            export_pref = gr.Button("Export preferences (TRL prompt/chosen/rejected)")
            export_kto = gr.Button("Export thumbs (TRL prompt/completion/label)")
        export_file = gr.File(label="Download", interactive=False)
        delete_mine = gr.Button("Delete my data", variant="stop")
        with gr.Row(visible=False) as confirm_row:
            gr.Markdown("Delete every answer, vote and chat this browser sent? This cannot be undone.")
            confirm_delete = gr.Button("Yes, delete my data", variant="stop")
            cancel_delete = gr.Button("Cancel")
        delete_status = gr.Markdown()
        for event in (refresh.click, tab.select, demo.load):  # fresh on every page load
            event(events.on_refresh, None, [counts, mine, model_info], **PRIVATE)
        export_pref.click(events.export_preferences, None, export_file, api_name="export_preferences")
        export_kto.click(events.export_unpaired, None, export_file, api_name="export_unpaired")
        # Two steps: the first click only asks; deleting needs the confirmation.
        delete_mine.click(ask_delete, None, [confirm_row, delete_status], **PRIVATE)
        cancel_delete.click(hide_row, None, confirm_row, **PRIVATE)
        confirm_delete.click(
            events.on_delete, None, [delete_status, confirm_row, counts, export_file, *chat], api_name="delete_my_data"
        )
        if runtime.settings.admin_token:  # absent, not just disabled, without a token
            build_admin(events, export_file)
    return tab


def confirmation(question: str) -> tuple[gr.Row, gr.Button, gr.Button]:
    """A hidden row that asks before an action that cannot be undone: (row, yes, cancel)."""
    with gr.Row(visible=False) as row:
        gr.Markdown(question)
        yes = gr.Button("Yes", variant="stop")
        cancel = gr.Button("Cancel")
    cancel.click(hide_row, None, row, **PRIVATE)
    return row, yes, cancel


def show_row() -> Any:
    return gr.Row(visible=True)


def build_admin(events: DataEvents, export_file: gr.File) -> None:
    """The admin accordion: pin a version, serve the base model, train now, raw export. Pin and
    reset change what every visitor is served: each asks first."""
    with gr.Accordion("Admin", open=False):
        token = gr.Textbox(label="Admin token", type="password")
        version = gr.Dropdown(label="Version", choices=events.versions(), value=None)  # nothing chosen: nothing pinned
        with gr.Row():
            rollback = gr.Button("Pin / roll back to version")
            reset = gr.Button("Reset to base model")
            train = gr.Button("Train now")
            raw_export = gr.Button("Raw export (with visitor ids)")
        pin_row, pin_yes, _ = confirmation("Serve the chosen version to every visitor from now on?")
        reset_row, reset_yes, _ = confirmation("Serve the base model without any adapter to every visitor?")
        admin_status = gr.Markdown()
        rollback.click(show_row, None, pin_row, **PRIVATE)
        pin_yes.click(events.rollback, [version, token], admin_status, **PRIVATE).then(hide_row, None, pin_row, **PRIVATE)
        reset.click(show_row, None, reset_row, **PRIVATE)
        reset_yes.click(events.reset_to_base, [token], admin_status, **PRIVATE).then(hide_row, None, reset_row, **PRIVATE)
        train.click(events.train_now, [token], admin_status, **PRIVATE)
        raw_export.click(events.raw_export, [token], export_file, **PRIVATE)
        version.focus(events.version_choices, None, version, **PRIVATE)

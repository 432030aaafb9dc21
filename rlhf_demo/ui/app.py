"""Gradio Blocks: Chat, Compare and Data tabs, wired to :mod:`rlhf_demo.ui.handlers`.

This file only connects components to handlers; every rule lives in the handlers so that
tests can call them directly. :class:`UserError` and store errors become ``gr.Error``
messages for the visitor (logged in one line, no traceback); anything else becomes a
generic message, never Python's exception text. Who the visitor is comes from the signed
cookie the :class:`~rlhf_demo.visitors.VisitorMiddleware` issues (see
:func:`launch_options`), never from Gradio's session hash.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from rlhf_demo.hub_sync import persistence_note
from rlhf_demo.runtime import Runtime
from rlhf_demo.serving import EngineError, PromptRefused
from rlhf_demo.store import InvalidInputError, StoreBusyError, StoreError, UnknownIdError
from rlhf_demo.ui import dashboard
from rlhf_demo.ui.guidelines import guidelines_markdown
from rlhf_demo.ui.handlers import OUTCOMES, SOURCES, ChatState, Handlers, PairState, UserError, check_event
from rlhf_demo.ui.reasons import reasons_panel
from rlhf_demo.visitors import Visitor, VisitorMiddleware, identify
from rlhf_demo.worker.status import read_status
from rlhf_demo.worker.supervisor import WorkerSupervisor

log = logging.getLogger(__name__)
GENERIC_ERROR = "The server could not complete this request; please try again."
# Toasts are page-wide in Gradio: short-lived, so that they neither pile up ("Error (2)") nor
# follow the visitor to another tab for long.
TOAST_SECONDS = 5
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
# Toasts are page-wide in Gradio: switching tabs dismisses the open ones, so an error on one tab
# does not follow the visitor to the next.
DISMISS_TOASTS_JS = "() => document.querySelectorAll('[data-testid=\"toast-close\"]').forEach((b) => b.click())"
# Store errors whose messages are written for people; others may carry SQLite's text.
PLAIN_STORE_ERRORS = (InvalidInputError, UnknownIdError, StoreBusyError)


def translate(exc: Exception, where: str) -> gr.Error:
    """A visitor-facing ``gr.Error``: our own refusals as they are (one log line, no
    traceback: they are expected), anything else generic (with a traceback in the log:
    that is a bug)."""
    if isinstance(exc, (UserError, PromptRefused, EngineError)) or isinstance(exc, PLAIN_STORE_ERRORS):
        log.info("refused %s: %s", where, str(exc)[:200])
        return gr.Error(str(exc), duration=TOAST_SECONDS, print_exception=False)
    if isinstance(exc, StoreError):
        log.warning("store error in %s: %s", where, str(exc)[:200])
    else:
        log.error("unexpected error in %s", where, exc_info=exc)
    return gr.Error(GENERIC_ERROR, duration=TOAST_SECONDS, print_exception=False)


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every error into a visible ``gr.Error`` (plain or generator handlers)."""
    where = getattr(fn, "__name__", "handler")

    if _is_generator(fn):

        @functools.wraps(fn)
        def gen(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:  # noqa: BLE001 - translated, never shown raw
                raise translate(exc, where) from None

        return gen

    @functools.wraps(fn)
    def plain(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - translated, never shown raw
            raise translate(exc, where) from None

    return plain


def launch_options(runtime: Runtime) -> dict[str, Any]:
    """Keyword arguments for ``Blocks.launch``: the visitor-cookie middleware on the app
    Gradio builds, an upload size limit, and no raw exception text for clients."""
    from starlette.middleware import Middleware

    return {
        "app_kwargs": {"middleware": [Middleware(VisitorMiddleware, signer=runtime.signer, secure=runtime.settings.trust_proxy)]},
        "max_file_size": runtime.settings.limits.max_upload_size,
        "show_error": False,
        "js": KEYBOARD_JS,
    }


def _is_generator(fn: Callable[..., Any]) -> bool:
    import inspect

    return inspect.isgeneratorfunction(fn)


def build_app(runtime: Runtime, supervisor: WorkerSupervisor | None = None) -> gr.Blocks:
    """The whole UI for one runtime (and the worker it supervises, if any)."""
    h = Handlers(runtime)
    store = runtime.store
    bounds = runtime.settings.sampling
    guidelines = guidelines_markdown(runtime.settings)

    def _session(request: gr.Request | None) -> Visitor:
        """The visitor behind a request (the name is historical: it is not the session)."""
        return identify(request, runtime.signer, runtime.visitors, runtime.settings.trust_proxy)

    # delete_cache: Gradio's copies of downloaded exports go within the hour, so "delete
    # my data" does not leave them behind for long.
    with gr.Blocks(title="rlhf-demo: a chat that learns from your votes", delete_cache=(1800, 3600)) as demo:
        gr.Markdown("# rlhf-demo\nChat, rate answers with 👍/👎, compare two answers, and watch the model learn.")
        model_info = gr.Markdown()
        # fresh on every page load (a callable value would be listed as an API endpoint)
        demo.load(h.model_markdown, None, model_info, api_visibility="private")

        with gr.Tab("Chat") as chat_tab:
            with gr.Accordion("Rater guidelines: what to reward", open=False, elem_id="chat-guidelines"):
                gr.Markdown(guidelines)
            chat_state = gr.State(ChatState())
            chatbot = gr.Chatbot(label="Chat", height=460, feedback_options=("Like", "Dislike"))
            with gr.Row():
                message = gr.Textbox(placeholder="Ask anything…", show_label=False, scale=5, max_lines=8)
                send = gr.Button("Send", variant="primary", scale=1)
                stop = gr.Button("Stop", variant="stop", scale=1, visible=False)
            vote_status = gr.Markdown(elem_id="chat-vote-status")
            thumb_why = reasons_panel("chat-reasons", "What was wrong with this answer? (optional)")
            with gr.Accordion("Settings", open=False):
                temperature = gr.Slider(bounds.min_temperature, bounds.max_temperature, bounds.temperature, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(bounds.min_top_p, 1.0, bounds.top_p, step=0.05, label="Top-p")
                max_new = gr.Slider(1, bounds.max_max_new_tokens, bounds.max_new_tokens, step=1, label="Max new tokens")

            @_friendly
            def on_chat(msg: str, chat: list, state: ChatState, t: float, p: float, n: int, request: gr.Request) -> Iterator[Any]:
                for value in h.chat(_session(request), msg, chat, state, t, p, n):
                    yield value, "", state

            # Event data arrives as the base gr.EventData and is validated here: the typed
            # classes (LikeData, ...) fail inside Gradio on a missing or odd payload.
            @_friendly
            def on_retry(chat: list, state: ChatState, t: float, p: float, n: int, data: gr.EventData, request: gr.Request) -> Iterator[Any]:
                index = check_event(data, ("index",))["index"]
                for value in h.retry(_session(request), chat, state, index, temperature=t, top_p=p, max_new_tokens=n):
                    yield value, state

            @_friendly
            def on_undo(chat: list, state: ChatState, data: gr.EventData) -> tuple[Any, ...]:
                new_chat, last = h.undo(chat, state, check_event(data, ("index",))["index"])
                return new_chat, last, state

            @_friendly
            def on_like(state: ChatState, data: gr.EventData, request: gr.Request) -> tuple[Any, ...]:
                payload = check_event(data, ("index",))
                said = h.like(_session(request), state, payload["index"], payload.get("liked", True))
                return said, state, *thumb_why.shown(state.disliked is not None)  # reasons after a 👎

            @_friendly
            def on_thumb_reasons(state: ChatState, tags: Any, comment: Any, request: gr.Request) -> str:
                return h.thumb_reasons(_session(request), state, tags, comment)

            def on_clear(state: ChatState) -> tuple[Any, ...]:
                return *h.clear(state), *thumb_why.shown(False)

            def writing() -> tuple[Any, Any]:  # Stop replaces Send while an answer streams
                return gr.Button(visible=False), gr.Button(visible=True)

            def idle() -> tuple[Any, Any]:
                return gr.Button(visible=True), gr.Button(visible=False)

            chat_inputs = [message, chatbot, chat_state, temperature, top_p, max_new]
            retry_inputs = [chatbot, chat_state, temperature, top_p, max_new]
            for trigger, fn, inputs, outputs, api_name in (
                (send.click, on_chat, chat_inputs, [chatbot, message, chat_state], "chat"),
                (message.submit, on_chat, chat_inputs, [chatbot, message, chat_state], None),
                (chatbot.retry, on_retry, retry_inputs, [chatbot, chat_state], None),
            ):
                trigger(writing, None, [send, stop], queue=False, api_visibility="private")
                visibility = "public" if api_name else "private"
                trigger(fn, inputs, outputs, api_name=api_name, api_visibility=visibility).then(
                    idle, None, [send, stop], queue=False, api_visibility="private"
                )
            # Stop: the answer ends at its next token and is kept (recorded, rateable); not Gradio's
            # `cancels`, which would leave a half answer the server has no record of.
            stop.click(_friendly(h.stop), [chat_state], [vote_status], queue=False, api_visibility="private")
            chatbot.undo(on_undo, [chatbot, chat_state], [chatbot, message, chat_state], api_visibility="private")
            thumb_why_out = [thumb_why.box, thumb_why.tags, thumb_why.comment, thumb_why.status]
            chatbot.like(on_like, [chat_state], [vote_status, chat_state, *thumb_why_out], api_visibility="private")
            thumb_why.send.click(on_thumb_reasons, [chat_state, thumb_why.tags, thumb_why.comment], [thumb_why.status], api_visibility="private")
            # The Chatbot's own trash button is the one Clear: it empties the chat in the browser,
            # this starts a new conversation on the server.
            chatbot.clear(on_clear, [chat_state], [chatbot, chat_state, *thumb_why_out], api_visibility="private")

            # The same vote for API clients (gradio_client cannot send LikeData): index + liked.
            api_index = gr.Number(visible=False, precision=0)
            api_liked = gr.Checkbox(visible=False)
            api_rate = gr.Button(visible=False)

            @_friendly
            def on_api_rate(state: ChatState, index: float, liked: bool, request: gr.Request) -> str:
                return h.rate_api(_session(request), state, index, liked)  # no bool(): "Dislike" is truthy

            api_rate.click(on_api_rate, [chat_state, api_index, api_liked], [vote_status], api_name="rate")

        with gr.Tab("Compare") as compare_tab:
            pair_state = gr.State(PairState())
            gr.Markdown(
                "Two anonymous answers to your prompt, side by side. Vote for the better one; who wrote each is revealed after your vote. "
                "Keys: **A**, **B**, **T** (tie), **X** (both bad), **N** (new round)."
            )
            with gr.Accordion("Rater guidelines: what to reward", open=False, elem_id="compare-guidelines"):
                gr.Markdown(guidelines)
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", scale=4)
                source = gr.Radio(list(SOURCES), value=next(iter(SOURCES)), label="Compare", scale=2)
            generate = gr.Button("Generate two answers", variant="primary")
            with gr.Row():
                answer_a = gr.Markdown(container=True, elem_id="compare-answer-a")
                answer_b = gr.Markdown(container=True, elem_id="compare-answer-b")
            with gr.Row():
                vote_buttons = [gr.Button(label, interactive=False, elem_id=f"vote-{outcome}") for label, outcome in OUTCOMES.items()]
            reveal = gr.Markdown(elem_id="compare-reveal")
            pair_why = reasons_panel("compare-reasons", "What was wrong with the worse answer (or both)? (optional)")
            new_round = gr.Button("New round", visible=False, elem_id="compare-new-round")

            @_friendly
            def on_compare(text: str, src: str, t: float, p: float, n: int, request: gr.Request) -> Iterator[Any]:
                for a, b, state in h.compare_stream(_session(request), text, src, temperature=t, top_p=p, max_new_tokens=n):
                    cursor = " ▌" if state.generating else ""
                    yield f"**A**\n\n{a}{cursor}", f"**B**\n\n{b}{cursor}", state, "Writing both answers…" if state.generating else "Which answer is better?"

            def vote_controls(state: PairState) -> list[Any]:
                """Votes open once both answers are recorded and lock after the vote (as in Chatbot
                Arena); "New round" appears after the vote. Display only: the handler checks again."""
                ready = isinstance(state, PairState) and state.response_ids is not None and not state.generating
                voted = ready and state.voted
                # the "why" panel: shown empty after each vote
                return [*(gr.Button(interactive=ready and not voted) for _ in vote_buttons), gr.Button(visible=bool(voted)), *pair_why.shown(bool(voted))]

            def locked() -> list[Any]:
                return [*(gr.Button(interactive=False) for _ in vote_buttons), gr.Button(visible=False), *pair_why.shown(False)]

            def on_new_round() -> tuple[Any, ...]:
                return "", "", "", "", h.new_round(), *locked()

            @_friendly
            def on_pair_reasons(state: PairState, tags: Any, comment: Any, request: gr.Request) -> str:
                return h.pair_reasons(_session(request), state, tags, comment)

            vote_controls_out = [*vote_buttons, new_round, pair_why.box, pair_why.tags, pair_why.comment, pair_why.status]
            generate.click(locked, None, vote_controls_out, queue=False, api_visibility="private")
            generate.click(on_compare, [prompt, source, temperature, top_p, max_new], [answer_a, answer_b, pair_state, reveal], api_name="compare").then(
                vote_controls, [pair_state], vote_controls_out, queue=False, api_visibility="private"
            )
            for button in vote_buttons:

                @_friendly
                def on_vote(state: PairState, request: gr.Request, label: str = button.value) -> tuple[Any, ...]:
                    return h.vote_pair(_session(request), state, label)

                button.click(on_vote, [pair_state], [reveal, pair_state], api_name=f"vote_{OUTCOMES[button.value]}").then(
                    vote_controls, [pair_state], vote_controls_out, queue=False, api_visibility="private"
                )
            pair_why.send.click(on_pair_reasons, [pair_state, pair_why.tags, pair_why.comment], [pair_why.status], api_visibility="private")
            new_round.click(on_new_round, None, [prompt, answer_a, answer_b, reveal, pair_state, *vote_controls_out], queue=False, api_visibility="private")

        with gr.Tab("Data") as data_tab:
            counts = gr.Markdown(elem_id="data-counts")
            demo.load(h.counts_markdown, None, counts, api_visibility="private")  # fresh on every page load
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
            for event in (refresh.click, data_tab.select):
                event(lambda: (h.counts_markdown(), h.model_markdown()), None, [counts, model_info], api_visibility="private")
            export_pref.click(_friendly(lambda: h.export("preferences")), None, export_file, api_name="export_preferences")
            export_kto.click(_friendly(lambda: h.export("unpaired")), None, export_file, api_name="export_unpaired")

            @_friendly
            def on_delete(request: gr.Request) -> tuple[Any, ...]:
                return h.delete_my_data(_session(request)), gr.Row(visible=False), h.counts_markdown(), None

            # Two steps: the first click only asks; deleting needs the confirmation.
            delete_mine.click(lambda: (gr.Row(visible=True), ""), None, [confirm_row, delete_status], api_name=False)
            cancel_delete.click(lambda: gr.Row(visible=False), None, confirm_row, api_name=False)
            confirm_delete.click(on_delete, None, [delete_status, confirm_row, counts, export_file], api_name="delete_my_data")

            if runtime.settings.admin_token:  # absent, not just disabled, without a token
                with gr.Accordion("Admin", open=False):
                    token = gr.Textbox(label="Admin token", type="password")
                    version = gr.Dropdown(label="Version", choices=[v["version"] for v in store.list_versions() if v["status"] != "rejected"])
                    with gr.Row():
                        rollback = gr.Button("Pin / roll back to version")
                        reset = gr.Button("Reset to base model")
                        train = gr.Button("Train now")
                        raw_export = gr.Button("Raw export (with session ids)")
                    admin_status = gr.Markdown()
                    rollback.click(_friendly(h.rollback), [version, token], admin_status, api_visibility="private")
                    reset.click(_friendly(h.reset_to_base), [token], admin_status, api_visibility="private")
                    train.click(_friendly(h.train_now), [token], admin_status, api_visibility="private")
                    raw_export.click(_friendly(lambda t: h.export("preferences", include_session_ids=True, admin_token=t)), [token], export_file, api_visibility="private")
                    version.focus(lambda: gr.Dropdown(choices=[v["version"] for v in store.list_versions() if v["status"] != "rejected"]), None, version, api_visibility="private")

        with gr.Tab("Dashboard") as dashboard_tab:
            worker_md = gr.Markdown()
            sync_md = gr.Markdown()
            next_training = gr.Markdown(elem_id="dashboard-next-training")
            gr.Markdown("**Learning curves**")
            curves_md = gr.Markdown()
            curves = gr.Plot(show_label=False)  # its floating label covered the first plot's title
            gr.Markdown(
                "**Leaderboard: human votes between versions** (every Compare match between two different versions; "
                "Bradley–Terry rating on the Elo scale, oldest version = 1000, with a 95 % bootstrap interval)"
            )
            board_md = gr.Markdown()
            board = gr.Dataframe(headers=dashboard.LEADERBOARD_COLUMNS, interactive=False)
            gr.Markdown("**Versions**")
            versions = gr.Dataframe(headers=dashboard.VERSION_COLUMNS, interactive=False)
            gr.Markdown("**Recent training runs**")
            runs = gr.Dataframe(headers=["run", "started", "status", "decision", "reason / error"], interactive=False)
            refresh_dash = gr.Button("Refresh plots")

            def worker_markdown() -> tuple[str, str]:
                described = supervisor.describe() if supervisor else None
                status = described["status"] if described else read_status(runtime.settings.worker_dir)
                process = described["process"] if described else None
                sync = runtime.status.last_error or f"Serving **{runtime.server.active}**."
                return dashboard.status_markdown(status, process), sync

            def tables() -> tuple[Any, ...]:
                board_rows = dashboard.leaderboard_rows(store)
                return (
                    dashboard.training_markdown(store, runtime.settings.training),
                    dashboard.curves_note(store),
                    dashboard.curves_figure(store),
                    dashboard.leaderboard_note(board_rows),
                    board_rows,
                    dashboard.versions_rows(store),
                    dashboard.run_rows(store),
                )

            table_outputs = [next_training, curves_md, curves, board_md, board, versions, runs]

            timer = gr.Timer(5)
            timer.tick(worker_markdown, None, [worker_md, sync_md], show_progress="hidden", api_visibility="private")
            timer.tick(h.model_markdown, None, model_info, show_progress="hidden", api_visibility="private")  # its active adapter changes
            timer.tick(lambda: dashboard.training_markdown(store, runtime.settings.training), None, next_training, show_progress="hidden", api_visibility="private")
            refresh_dash.click(tables, None, table_outputs, api_visibility="private")
            demo.load(worker_markdown, None, [worker_md, sync_md], api_visibility="private")
            demo.load(tables, None, table_outputs, api_visibility="private")
        for each_tab in (chat_tab, compare_tab, data_tab, dashboard_tab):
            each_tab.select(None, None, None, js=DISMISS_TOASTS_JS, queue=False, api_visibility="private")
    return demo


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (tests, benchmarks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(runtime: Runtime) -> tuple[gr.Blocks, str]:
    """Build and start the app on a free 127.0.0.1 port without blocking (tests, benchmarks)."""
    port = free_port()
    demo = build_app(runtime)
    demo.queue(default_concurrency_limit=runtime.settings.limits.max_concurrent_generations)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options(runtime))
    return demo, f"http://127.0.0.1:{port}/"

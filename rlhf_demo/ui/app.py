"""Gradio Blocks: the Chat, Compare, Data and Dashboard tabs, each built by its own module.

This file only puts the tabs together; each tab's module wires its components to event
adapters (:mod:`rlhf_demo.ui.events`), and every rule lives in the handlers
(:mod:`rlhf_demo.ui.handlers`) so that tests can call them directly.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from rlhf_demo.limits import RequestLimits, trust_forwarded_headers
from rlhf_demo.runtime import Runtime
from rlhf_demo.ui import dashboard
from rlhf_demo.ui.chat import ChatEvents, build_chat_tab
from rlhf_demo.ui.compare import KEYBOARD_JS, CompareEvents, build_compare_tab
from rlhf_demo.ui.data import DataEvents, build_data_tab
from rlhf_demo.ui.events import GENERIC_ERROR, PRIVATE, translate
from rlhf_demo.ui.guidelines import guidelines_markdown
from rlhf_demo.ui.handlers import Handlers
from rlhf_demo.visitors import VisitorMiddleware, login_button
from rlhf_demo.worker.supervisor import WorkerSupervisor

# Toasts are page-wide in Gradio: switching tabs dismisses the open ones, so an error on one tab
# does not follow the visitor to the next.
HEADER_REFRESH_S = 5.0  # how soon the header names a newly served version
DISMISS_TOASTS_JS = "() => document.querySelectorAll('[data-testid=\"toast-close\"]').forEach((b) => b.click())"
# On a phone the header takes one short line, so the chat starts on the first screen.
HEADER_CSS = """
@media (max-width: 640px) {
  #header h1 { font-size: 1.25rem; margin: 0; }
  #header p { display: none; }
  #model-info { font-size: 0.75rem; }
}
"""


def launch_options(runtime: Runtime) -> dict[str, Any]:
    """Keyword arguments for ``Blocks.launch``: the visitor-cookie middleware on the app
    Gradio builds, one body-size cap (also Gradio's file size limit), and no raw exception
    text for clients."""
    from starlette.middleware import Middleware

    trust_forwarded_headers(runtime.settings.trust_proxy)
    return {
        "app_kwargs": {
            "middleware": [
                Middleware(RequestLimits, max_body_bytes=runtime.settings.limits.max_request_bytes),
                Middleware(VisitorMiddleware, signer=runtime.signer, secure=runtime.settings.trust_proxy),
            ]
        },
        "max_file_size": runtime.settings.limits.max_request_bytes,  # Gradio's own multipart check, the same cap
        "show_error": False,
        "js": KEYBOARD_JS,
        "css": HEADER_CSS,
    }


def build_app(runtime: Runtime, supervisor: WorkerSupervisor | None = None) -> gr.Blocks:
    """The whole UI for one runtime (and the worker it supervises, if any)."""
    h = Handlers(runtime)  # one object: the tabs of a page share the vote rate limits
    guidelines = guidelines_markdown(runtime.settings)
    # delete_cache: Gradio's copies of downloaded exports go within the hour, so "delete
    # my data" does not leave them behind for long.
    with gr.Blocks(title="rlhf-demo: a chat that learns from your votes", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(
            "# rlhf-demo\nChat, rate answers with 👍/👎, compare two answers, and watch the model learn.", elem_id="header"
        )
        login_button()  # "Sign in with Hugging Face" on a Space with hf_oauth; absent elsewhere
        model_info = gr.Markdown(elem_id="model-info")
        # fresh on every page load (a callable value would be listed as an API endpoint)
        demo.load(h.model_markdown, None, model_info, **PRIVATE)
        # and after a hot-swap: a Timer ticks only while its tab is rendered, so this one sits
        # outside the tabs, where every page has it
        header_timer = gr.Timer(HEADER_REFRESH_S)
        header_timer.tick(h.model_markdown, None, model_info, show_progress="hidden", queue=False, **PRIVATE)
        chat = build_chat_tab(ChatEvents(h), guidelines, demo)
        compare_tab = build_compare_tab(CompareEvents(h), guidelines)
        data_tab = build_data_tab(DataEvents(h), model_info, [chat.chatbot, chat.state], demo)
        dashboard_tab = dashboard.build_dashboard_tab(dashboard.DashboardEvents(runtime, supervisor), demo)
        for each_tab in (chat.tab, compare_tab, data_tab, dashboard_tab):
            each_tab.select(None, None, None, js=DISMISS_TOASTS_JS, queue=False, **PRIVATE)
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


__all__ = ["GENERIC_ERROR", "build_app", "free_port", "launch_local", "launch_options", "translate"]

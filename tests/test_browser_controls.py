"""Chromium drives the controls beyond the basics: an example prompt, editing a sent message
(a new branch stored with its parent), the "your votes" counter, "Delete my data", and a page
that stays usable after a failed event (no "Error" overlay hiding the chat or the pair).

Same harness as :mod:`test_browser` (127.0.0.1 only, any unexpected error toast fails a test);
screenshots go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import re
from typing import Any

from conftest import wait_until
from test_browser import (  # noqa: F401 - browser, settings and tab are fixtures
    ANSWER_DONE,
    GENERATION_TIMEOUT_S,
    Tab,
    browser,
    require_browser,
    send_chat,
    settings,
    tab,
)

# Gradio's status overlay on a component whose last event failed: a full-size "Error" badge
# that covers the component (the chat, the answers) until that component's next success.
ERROR_BADGES = """() => [...document.querySelectorAll('[data-testid="status-tracker"] .error')]
  .filter((badge) => badge.offsetParent !== null).map((badge) => badge.closest('[id]')?.id || 'unnamed')"""


def refused(page: Tab, action: Any, message: str) -> None:
    """Run ``action``, wait for the refusal's toast, then forget it (the tab fixture fails on any other)."""
    action()
    wait_until(lambda: any(message in t for t in page.error_toasts()), timeout=20, what=f"the toast {message!r}")
    page.page.evaluate("window.__errorToasts = []")


def test_a_refused_event_leaves_the_chat_and_the_pair_visible_and_usable(tab: Tab, app_url: str, runtime) -> None:  # noqa: F811
    """A refused message must not leave Gradio's "Error" overlay on the chat and the textbox:
    it hid the conversation and swallowed clicks on its 👍 until the next successful Send.
    Likewise for Compare's answers after a refused follow-up."""
    require_browser()
    from playwright.sync_api import expect

    page = tab.page
    page.goto(app_url)
    log = send_chat(page, "First question")
    refused(tab, lambda: page.get_by_role("button", name="Send", exact=True).click(), "The message is empty.")
    expect(log.get_by_test_id("bot")).to_have_count(1)
    wait_until(lambda: page.evaluate(ERROR_BADGES) == [], what="no Error badge on the chat")
    expect(log.get_by_test_id("bot").last).to_be_visible()
    tab.shot("20-chat-after-a-refused-message")
    log.get_by_role("button", name="Like", exact=True).last.click(timeout=10_000)
    expect(page.get_by_text("👍 recorded.")).to_be_visible()

    page.get_by_role("tab", name="Compare").click()
    page.get_by_label("Prompt").fill("Name a fruit")
    page.get_by_role("button", name="Generate two answers").click()
    expect(page.get_by_text("Which answer is better?")).to_be_visible(timeout=GENERATION_TIMEOUT_S * 1000)
    refused(tab, lambda: page.get_by_role("button", name="Continue both").click(), "The message is empty.")
    wait_until(lambda: page.evaluate(ERROR_BADGES) == [], what="no Error badge on the pair")
    expect(page.locator("#compare-answer-a")).to_contain_text("A")
    tab.shot("21-compare-after-a-refused-follow-up")
    page.get_by_role("button", name="A is better", exact=True).click(timeout=10_000)
    expect(page.get_by_text(re.compile(r"Vote recorded: you chose A is better"))).to_be_visible()
    assert (runtime.store.counts()["thumbs_up"], runtime.store.counts()["preferences"]) == (1, 1)


def test_example_edit_vote_counter_and_delete_in_a_real_browser(tab: Tab, app_url: str, runtime) -> None:  # noqa: F811
    """An example prompt fills the box; editing the sent question answers it anew as a branch
    stored with the same parent; a 👍 shows in the "your votes" line; "Delete my data" empties
    the chat on screen and the next message starts a new conversation."""
    require_browser()
    from playwright.sync_api import expect

    page = tab.page
    page.goto(app_url)
    box = page.get_by_placeholder("Ask anything…")
    page.get_by_role("button", name="What is the capital of Australia?").click()
    expect(box).to_have_value("What is the capital of Australia?")
    page.get_by_role("button", name="Send", exact=True).click()
    log = page.get_by_role("log", name="chatbot conversation")
    expect(log.get_by_test_id("bot").last).to_contain_text(ANSWER_DONE, timeout=GENERATION_TIMEOUT_S * 1000)
    tab.shot("22-example-prompt-answered")
    send_chat(page, "And its population?")
    first, second = (row[0] for row in runtime.store.db.execute("select id from responses order by rowid"))

    # Edit the second question: a new answer to the edited text, on the same parent as the old one.
    log.get_by_test_id("user").last.hover()
    log.get_by_role("button", name="Edit").last.click()
    editor = log.locator("textarea")
    editor.fill("And its area?")
    log.get_by_role("button", name="Submit").click()
    expect(log.get_by_test_id("user").last).to_have_text("And its area?")
    expect(log.get_by_test_id("bot")).to_have_count(2)
    expect(log.get_by_test_id("bot").last).to_contain_text(ANSWER_DONE, timeout=GENERATION_TIMEOUT_S * 1000)
    wait_until(lambda: runtime.store.counts()["responses"] == 3, what="the edited branch in SQLite")
    edited = runtime.store.db.execute("select id, parent_id, prompt_json from responses order by rowid desc limit 1").fetchone()
    assert edited[1] == first and runtime.store.get_response(second)["parent_id"] == first  # two branches, one parent
    assert '"And its area?"' in edited[2] and "population" not in edited[2]
    tab.shot("23-edited-message-branch")

    # The vote counter on the Data tab follows a vote.
    page.get_by_role("tab", name="Data").click()
    mine = page.locator("#data-my-votes")
    expect(mine).to_contain_text("Your votes: none yet")
    page.get_by_role("tab", name="Chat").click()
    log.get_by_role("button", name="Like", exact=True).last.click()
    expect(page.get_by_text("👍 recorded.")).to_be_visible()
    page.get_by_role("tab", name="Data").click()
    expect(mine).to_contain_text(re.compile(r"Your votes: 1 of your 1 vote examples count"))
    tab.shot("24-your-votes-counter")

    # Delete my data: asked first, then the record and the chat on screen are gone.
    page.get_by_role("button", name="Delete my data").click()
    page.get_by_role("button", name="Yes, delete my data").click()
    expect(page.get_by_text(re.compile(r"^Deleted: "))).to_be_visible()
    assert runtime.store.counts()["responses"] == 0
    page.get_by_role("tab", name="Chat").click()
    expect(log.get_by_test_id("bot")).to_have_count(0)
    tab.shot("25-deleted-chat-cleared")
    send_chat(page, "A fresh start")  # no "unknown response": the page forgot the deleted chat
    assert runtime.store.counts()["responses"] == 1
    assert tab.dialogs == [] and tab.page_errors == [] and tab.blocked == []


def test_the_header_names_the_version_that_answers_while_the_chat_tab_is_open(
    tab: Tab,  # noqa: F811
    app_url: str,
    runtime,
    tiny_loaded,
) -> None:
    """A hot-swap while a visitor sits on the Chat tab: the header's adapter follows (its refresh
    must not depend on the Dashboard tab being open)."""
    require_browser()
    from conftest import write_random_adapter
    from playwright.sync_api import expect

    page = tab.page
    page.goto(app_url)
    header = page.locator("#model-info")
    expect(header).to_contain_text(re.compile(r"adapter:\s*v0"))
    folder = write_random_adapter(tiny_loaded, runtime.settings, "v1", seed=1)
    runtime.store.register_version("v1", str(folder), "v0", "active", {})
    assert runtime.sync_registry() == "v1"
    expect(header).to_contain_text(re.compile(r"adapter:\s*v1"), timeout=30_000)
    send_chat(page, "Which version answers?", done="written by adapter v1")
    tab.shot("26-header-follows-swap")

"""A real browser (Debian's chromium via Playwright) drives the app: chat + 👍, 👎 with reason tags, Retry, Undo, Stop, Clear,
A/B vote (locked after the vote, reasons, keyboard shortcuts, New round), rater guidelines, Data tab, XSS. Any error toast fails a test.

The app is launched on 127.0.0.1 only, and the browser is kept off every other host (DNS
rules plus a request filter). Screenshots of each step go to ``test-artifacts/browser/``.

Without ``/usr/bin/chromium`` the tests are skipped, except under CI (env ``CI`` set, or
``RLHF_DEMO_REQUIRE_BROWSER=1`` as ``.ci/run`` exports), where they fail: CI apt-installs ``chromium``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # no name resolves: only 127.0.0.1 is reachable
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "browser"
# Every URL whose host is not 127.0.0.1 (a JavaScript-compatible regex: Playwright matches it in the browser).
OTHER_HOSTS = re.compile(r"^(?![a-z]+://127\.0\.0\.1(?::\d+)?(?:/|$))")
TIMEOUT_MS = 30_000  # generous: the CPU may be shared with other jobs
GENERATION_TIMEOUT_S = 120  # a whole answer, when this (niced) test shares the CPU with a benchmark
ANSWER_DONE = "written by adapter v0"
# Every error toast the page shows is recorded (toasts vanish after a few seconds, so a check at
# the end alone would miss them).
RECORD_ERROR_TOASTS = """
window.__errorToasts = [];
new MutationObserver(() => {
  for (const el of document.querySelectorAll('[data-testid="toast-body"].error:not([data-seen])')) {
    el.setAttribute('data-seen', '1');
    window.__errorToasts.push(el.innerText.replace(/\\s+/g, ' ').trim());
  }
}).observe(document, {childList: true, subtree: true});
"""


def _missing(reason: str) -> None:
    """Fail under CI (the browser must be there), skip on a developer machine."""
    if os.environ.get("CI") or os.environ.get("RLHF_DEMO_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser test cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _browser_problem() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Python package `playwright` is not installed (pip install -r requirements-dev.txt)"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)"
    return None


def require_browser() -> None:
    problem = _browser_problem()
    if problem:
        _missing(problem)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless chromium for the module; None when it cannot run (the test then skips or fails)."""
    if _browser_problem():
        yield None
        return
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)  # expect() has its own default (5 s), separate from the page's
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Tab:
    """A page with its own context, a 127.0.0.1-only request filter, and dialog/error recording."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.blocked: list[str] = []
        self.dialogs: list[str] = []
        self.page_errors: list[str] = []
        # Only requests to other hosts are routed (the pattern is matched inside the browser): a
        # route handler runs on this thread, and only while the test is inside a Playwright call,
        # so routing every request froze the app's own requests while the test slept in
        # wait_until (the Retry click's queue/join waited there until the test timed out).
        self.context.route(OTHER_HOSTS, self._block)
        self.context.add_init_script(RECORD_ERROR_TOASTS)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.on("dialog", self._on_dialog)
        self.page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))

    def _block(self, route: Any) -> None:
        self.blocked.append(route.request.url)
        route.abort()

    def _on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def error_toasts(self) -> list[str]:
        return self.page.evaluate("window.__errorToasts || []")

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser, request: pytest.FixtureRequest) -> Iterator[Tab | None]:
    """None without a browser: each test then calls require_browser() first, so CI reports a FAIL, not an ERROR."""
    if browser is None:
        yield None
        return
    if "app_url" in request.fixturenames:
        # The app starts before the page and closes after its toasts are read: a page that
        # outlives its app sees a stopped queue ("This application is currently busy").
        request.getfixturevalue("app_url")
    t = Tab(browser)
    try:
        yield t
        toasts = t.error_toasts()  # every test: an error toast anywhere is a failure
    finally:
        t.close()
    assert toasts == [], f"error toasts: {toasts}"


@pytest.fixture
def settings(settings):
    """Short answers (the default length in the slider): the CPU may be shared with other jobs."""
    import dataclasses

    return dataclasses.replace(settings, sampling=dataclasses.replace(settings.sampling, max_new_tokens=24))


def send_chat(page: Any, text: str, done: str | re.Pattern[str] = ANSWER_DONE) -> Any:
    """Type ``text`` on the Chat tab, press Send, and return the chatbot log once the answer is final
    (the version tag ``done`` is added to an answer only when it is complete)."""
    from playwright.sync_api import expect

    log = page.get_by_role("log", name="chatbot conversation")
    answers_before = log.get_by_test_id("bot").count()
    page.get_by_placeholder("Ask anything…").fill(text)
    page.get_by_role("button", name="Send", exact=True).click()
    expect(log.get_by_test_id("bot")).to_have_count(answers_before + 1)
    expect(log.get_by_test_id("bot").last).to_contain_text(done, timeout=GENERATION_TIMEOUT_S * 1000)
    return log


def shortcut(page: Any, key: str) -> None:
    """Press ``key`` with nothing focused, as a visitor who is not typing would."""
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.keyboard.press(key)


def test_chat_like_compare_vote_and_data_in_a_real_browser(tab: Tab, app_url: str, runtime) -> None:
    require_browser()
    from playwright.sync_api import expect

    page = tab.page
    page.goto(app_url)
    expect(page.get_by_role("tab", name="Chat")).to_be_visible()
    tab.shot("01-loaded")
    page.locator("#chat-guidelines").get_by_text("Rater guidelines").click()  # the owner's text, folded by default
    expect(page.locator("#chat-guidelines")).to_contain_text("What to reward.")
    tab.shot("01b-guidelines")

    # Chat: send, wait for the final answer, 👍 it through the Chatbot's own feedback button.
    log = send_chat(page, "Hello from a real browser")
    expect(log.get_by_test_id("user")).to_have_text("Hello from a real browser")
    assert page.get_by_placeholder("Ask anything…").input_value() == ""
    tab.shot("02-chat-answer")
    wait_until(lambda: runtime.store.counts()["responses"] == 1, what="the chat answer in SQLite")

    log.get_by_role("button", name="Like", exact=True).last.click()
    expect(page.get_by_text("👍 recorded.")).to_be_visible()
    wait_until(lambda: runtime.store.counts()["thumbs_up"] == 1, what="a +1 rating row")
    assert runtime.store.counts()["thumbs_down"] == 0
    tab.shot("03-chat-liked")

    # Compare: two answers, vote A, versions revealed, one preference row.
    page.get_by_role("tab", name="Compare").click()
    page.get_by_label("Prompt").fill("Which colour is the sky?")
    page.get_by_role("button", name="Generate two answers").click()
    expect(page.get_by_text("Which answer is better?")).to_be_visible(timeout=GENERATION_TIMEOUT_S * 1000)
    for side in ("A", "B"):
        answer = page.get_by_test_id("markdown").filter(
            has=page.locator(f'p:first-child > strong:text-is("{side}")'), has_not_text="Keys:"
        )
        expect(answer).to_have_count(1)
        expect(answer).to_contain_text(re.compile(rf"^\s*{side}\s*\S"))  # the header plus a non-empty answer
    tab.shot("04-compare-answers")

    votes = [page.get_by_role("button", name=label, exact=True) for label in ("A is better", "B is better", "Tie", "Both bad")]
    for button in votes:
        expect(button).to_be_enabled()
    page.get_by_role("button", name="A is better", exact=True).click()
    expect(page.get_by_text(re.compile(r"Vote recorded: you chose A is better\. A was written by v0, B by v0\."))).to_be_visible()
    wait_until(lambda: runtime.store.counts()["preferences"] == 1, what="one preference row")
    for button in votes:  # locked after the vote, as in Chatbot Arena
        expect(button).to_be_disabled()
    # Why: reason tags and a comment, offered after the vote.
    why = page.locator("#compare-reasons")
    expect(why).to_be_visible()
    why.get_by_label("too long", exact=True).check()
    why.get_by_label("unhelpful", exact=True).check()
    why.get_by_label("Comment (optional)").fill("B wanders off.")
    why.get_by_role("button", name="Send reasons").click()
    expect(why.get_by_text("your reasons were saved")).to_be_visible()
    stored = runtime.store.db.execute("select reasons, comment from preferences").fetchone()
    assert stored == ('["unhelpful", "too long"]', "B wanders off.")
    tab.shot("05-compare-voted")

    # Keyboard: N starts a new round, T votes Tie (keys are ignored while typing in a box).
    shortcut(page, "n")
    expect(page.get_by_label("Prompt")).to_have_value("")
    page.get_by_label("Prompt").fill("Name a fruit")
    page.get_by_label("Prompt").press("Enter")  # Enter generates, as the button does
    expect(page.get_by_text("Which answer is better?")).to_be_visible(timeout=GENERATION_TIMEOUT_S * 1000)
    # The line that asks for a vote comes with the votes opening: a key pressed on reading it
    # votes (it came one update before them, and a busy machine lost the key in between).
    page.get_by_label("Prompt").press("t")  # typing: no vote
    expect(page.get_by_text(re.compile(r"A was written by"))).to_have_count(0)
    assert runtime.store.counts()["preferences"] == 1
    shortcut(page, "t")
    expect(page.get_by_text(re.compile(r"Vote recorded: you chose Tie\. A was written by"))).to_be_visible()
    wait_until(lambda: runtime.store.counts()["ties"] == 1, what="a tie from the T key")
    expect(why).to_be_visible()
    expect(why.get_by_label("too long", exact=True)).not_to_be_checked()  # each vote gets an empty "why"

    page.get_by_role("button", name="New round", exact=True).click()
    expect(page.get_by_label("Prompt")).to_have_value("")
    expect(page.get_by_text(re.compile(r"A was written by"))).to_have_count(0)
    expect(page.get_by_role("button", name="New round", exact=True)).to_be_hidden()
    for button in votes:
        expect(button).to_be_disabled()

    # Data: the counts are visible; Refresh shows this session's votes.
    page.get_by_role("tab", name="Data").click()
    counts = page.get_by_test_id("markdown").filter(has_text=re.compile(r"Responses\s*\d+"))
    expect(counts).to_be_visible()
    tab.shot("06-data-before-refresh")
    page.get_by_role("button", name="Refresh counts").click()
    expect(counts).to_contain_text(re.compile(r"Responses\s*5\b"))
    expect(counts).to_contain_text(re.compile(r"👍\s*1\b"))
    expect(counts).to_contain_text(re.compile(r"A/B pairs\s*1\b"))
    tab.shot("07-data-refreshed")

    final = runtime.store.counts()
    assert (final["responses"], final["thumbs_up"], final["preferences"], final["ties"]) == (5, 1, 1, 1)
    assert tab.dialogs == [] and tab.page_errors == []
    assert tab.error_toasts() == []
    assert tab.blocked == [], f"the page tried to reach other hosts: {tab.blocked}"


def test_chat_html_is_sanitized(tab: Tab, app_url: str, runtime) -> None:
    require_browser()
    from playwright.sync_api import expect

    page = tab.page
    page.goto(app_url)
    payload = 'Hi <script>window.__xss=1;alert("script")</script> <img src=x onerror="window.__xss=2;alert(\'img\')"> bye'
    log = send_chat(page, payload)
    user = log.get_by_test_id("user").last
    expect(user).to_contain_text("Hi")
    expect(user).to_contain_text("bye")
    page.wait_for_timeout(500)  # give a broken <img> time to fire onerror, had it kept the handler
    tab.shot("08-xss")

    assert page.evaluate("typeof window.__xss") == "undefined", (
        f"injected script ran: window.__xss={page.evaluate('window.__xss')!r}"
    )
    assert tab.dialogs == [], f"a dialog fired: {tab.dialogs}"
    assert log.locator("script").count() == 0
    assert log.locator("[onerror]").count() == 0
    assert runtime.store.counts()["responses"] == 1  # the message went through and was answered


def test_the_browser_reaches_only_127_0_0_1(tab: Tab, app_url: str) -> None:
    require_browser()
    page = tab.page
    page.goto(app_url)
    outcome = page.evaluate("fetch('http://example.com/probe').then(() => 'reached', () => 'refused')")
    assert outcome == "refused"
    assert tab.blocked == ["http://example.com/probe"]


def hold_until_stopped(runtime: Any, monkeypatch: Any, method: str = "stream") -> None:
    """Make the server's ``method`` wait after each token until the visitor presses Stop (or
    30 s pass), so that the test can press Stop while the answers are still being written."""
    original = getattr(runtime.server, method)

    def held_call(*args: Any, should_stop: Any = None, **kwargs: Any) -> Any:
        def held() -> bool:
            deadline = time.monotonic() + 30
            while not should_stop() and time.monotonic() < deadline:
                time.sleep(0.02)
            return should_stop()

        return original(*args, should_stop=held if should_stop else None, **kwargs)

    monkeypatch.setattr(runtime.server, method, held_call)


def test_every_chat_control_in_a_real_browser(tab: Tab, app_url: str, runtime, monkeypatch) -> None:
    """Send, 👍, 👎, Retry, Undo, Stop and Clear, each clicked; no error toast anywhere."""
    require_browser()
    from playwright.sync_api import expect

    page = tab.page
    page.goto(app_url)
    log = send_chat(page, "First question")
    bot = log.get_by_test_id("bot")
    log.get_by_role("button", name="Dislike", exact=True).last.click()
    expect(page.get_by_text("👎 recorded.")).to_be_visible()
    wait_until(lambda: runtime.store.counts()["thumbs_down"] == 1, what="a -1 rating row")
    why = page.locator("#chat-reasons")  # offered after a 👎
    why.get_by_label("wrong", exact=True).check()
    why.get_by_label("Comment (optional)").fill("Not an answer.")
    why.get_by_role("button", name="Send reasons").click()
    expect(why.get_by_text("your reasons were saved")).to_be_visible()
    assert runtime.store.db.execute("select reasons, comment from ratings").fetchone() == ('["wrong"]', "Not an answer.")
    tab.shot("09-chat-disliked-with-reasons")

    # Retry: Gradio sends the question's index; the answer is replaced by a new one.
    log.get_by_role("button", name="Retry").last.click()
    wait_until(
        lambda: runtime.store.counts()["responses"] == 2, timeout=GENERATION_TIMEOUT_S, what="the retried answer in SQLite"
    )
    expect(bot).to_have_count(1)
    expect(bot.last).to_contain_text(ANSWER_DONE)
    expect(log.get_by_test_id("user")).to_have_text("First question")
    tab.shot("10-chat-retried")
    log.get_by_role("button", name="Like", exact=True).last.click()  # the new answer is rateable
    expect(page.get_by_text("👍 recorded.")).to_be_visible()
    expect(why).to_be_hidden()  # a 👍 takes no reasons

    # Undo: the exchange leaves the chat, the question returns to the textbox.
    log.get_by_role("button", name="Undo").last.click()
    expect(bot).to_have_count(0)
    expect(page.get_by_placeholder("Ask anything…")).to_have_value("First question")
    tab.shot("11-chat-undone")

    # Stop: shown instead of Send while an answer streams; the answer so far is kept and recorded.
    hold_until_stopped(runtime, monkeypatch)
    page.get_by_placeholder("Ask anything…").fill("A long story, please")
    page.get_by_role("button", name="Send", exact=True).click()
    stop = page.get_by_role("button", name="Stop", exact=True)
    expect(stop).to_be_visible()
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_hidden()
    tab.shot("12-chat-streaming")
    stop.click()
    expect(bot.last).to_contain_text(ANSWER_DONE)
    expect(stop).to_be_hidden()
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    wait_until(
        lambda: runtime.store.counts()["responses"] == 3, timeout=GENERATION_TIMEOUT_S, what="the stopped answer in SQLite"
    )
    stopped = runtime.store.db.execute(
        "select finish_reason, conversation_id from responses order by rowid desc limit 1"
    ).fetchone()
    assert stopped[0] == "cancelled"
    tab.shot("13-chat-stopped")
    monkeypatch.undo()

    # The chat goes on after Stop (the record matches), then Clear starts a new conversation.
    send_chat(page, "Go on")
    page.get_by_role("button", name="Clear", exact=True).click()
    expect(log.get_by_test_id("bot")).to_have_count(0)
    send_chat(page, "A new topic")
    rows = runtime.store.db.execute("select conversation_id from responses order by rowid desc limit 3").fetchall()
    assert rows[1][0] == rows[2][0] == stopped[1] and rows[0][0] != stopped[1], "Clear must start a new conversation"
    tab.shot("14-chat-cleared")

    assert tab.error_toasts() == [], f"error toasts: {tab.error_toasts()}"
    assert tab.dialogs == [] and tab.page_errors == []
    assert tab.blocked == []


def test_send_comes_back_after_a_refused_message(tab: Tab, app_url: str, runtime) -> None:
    """A refused message (here: blank) shows its error, and Send (not Stop) is offered again."""
    require_browser()
    from playwright.sync_api import expect

    page = tab.page
    page.goto(app_url)
    page.get_by_placeholder("Ask anything…").fill("   ")
    page.get_by_role("button", name="Send", exact=True).click()
    wait_until(lambda: any("The message is empty." in t for t in tab.error_toasts()), what="the refusal's toast")
    page.evaluate("window.__errorToasts = []")  # expected: the tab fixture fails on any other toast
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Stop", exact=True)).to_be_hidden()
    tab.shot("15-send-after-error")
    send_chat(page, "Now a real question")
    assert runtime.store.counts()["responses"] == 1


def test_indented_question_keeps_its_conversation_and_a_vote_can_be_removed(tab: Tab, app_url: str, runtime) -> None:
    """Gradio dedents displayed text; the second turn must still be accepted, the question shown
    indented, and clicking the selected 👍 again removes the vote from the database. A reload
    brings the chat back."""
    require_browser()
    from playwright.sync_api import expect

    page = tab.page
    page.goto(app_url)
    log = send_chat(page, "Fix this code:\n\n    def f():\n        return 1")
    expect(log.get_by_test_id("user").first.locator("pre")).to_contain_text(
        re.compile(r"def f\(\):\n {4}return 1")
    )  # an indented code block
    send_chat(page, "Thanks")
    wait_until(lambda: runtime.store.counts()["responses"] == 2, what="the second turn in SQLite")
    log.get_by_role("button", name="Like", exact=True).last.click()
    wait_until(lambda: runtime.store.counts()["thumbs_up"] == 1, what="the 👍 in SQLite")
    log.get_by_role("button", name="Liked", exact=True).click()  # the selected thumb, clicked again
    expect(page.get_by_text("Vote removed.")).to_be_visible()
    wait_until(lambda: runtime.store.counts()["thumbs_up"] == 0, what="the 👍 removed in SQLite")
    tab.shot("16-indented-second-turn-vote-removed")

    # A reload brings the chat back (kept per visitor on the server), and it goes on.
    page.reload()
    expect(log.get_by_test_id("user")).to_have_count(2)
    expect(log.get_by_test_id("user").first.locator("pre")).to_contain_text(re.compile(r"def f\(\):\n {4}return 1"))
    send_chat(page, "A third turn after the reload")
    wait_until(lambda: runtime.store.counts()["responses"] == 3, what="the third turn in SQLite")
    tab.shot("17-chat-after-reload")

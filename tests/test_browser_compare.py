"""Chromium drives Compare beyond one vote: Enter generates, Stop ends both answers (which stay
votable), and "Continue both" asks both sides a follow-up that each answers from its own
conversation, voted on as a new pair.

Same harness as :mod:`test_browser`; screenshots go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from conftest import wait_until
from test_browser import GENERATION_TIMEOUT_S, Tab, browser, hold_until_stopped, require_browser, settings, tab  # noqa: F401 - fixtures


def pair_ids(runtime: Any) -> list[tuple[str, str, str]]:
    return runtime.store.db.execute("select response_a_id, response_b_id, outcome from preferences order by rowid").fetchall()


def test_compare_enter_stop_and_continue_both_in_a_real_browser(tab: Tab, app_url: str, runtime, monkeypatch) -> None:  # noqa: F811
    require_browser()
    from playwright.sync_api import expect

    page = tab.page
    page.goto(app_url)
    page.get_by_role("tab", name="Compare").click()
    better = page.get_by_text("Which answer is better?")
    stop = page.locator("#compare-stop")

    # Stop: both answers end at their next token, are recorded and can be voted on.
    hold_until_stopped(runtime, monkeypatch, "stream_pair")
    page.get_by_label("Prompt").fill("Tell me a long story")
    page.get_by_label("Prompt").press("Enter")  # Enter generates, as the button does
    expect(page.get_by_text("Writing both answers…")).to_be_visible()  # the pair's Stop is live
    expect(stop).to_be_visible()
    expect(page.get_by_role("button", name="Generate two answers")).to_be_hidden()
    tab.shot("30-compare-streaming")
    stop.click()
    expect(better).to_be_visible(timeout=GENERATION_TIMEOUT_S * 1000)
    expect(stop).to_be_hidden()
    wait_until(lambda: runtime.store.counts()["responses"] == 2, what="the stopped pair in SQLite")
    assert [r[0] for r in runtime.store.db.execute("select finish_reason from responses")] == ["cancelled"] * 2
    page.get_by_role("button", name="A is better", exact=True).click()
    expect(page.get_by_text(re.compile(r"Vote recorded: you chose A is better"))).to_be_visible()
    tab.shot("31-compare-stopped-and-voted")
    monkeypatch.undo()
    (first,) = pair_ids(runtime)

    # Continue both: each side answers the follow-up from its own conversation; a new pair to vote on.
    followup = page.get_by_label("Follow-up for both")
    followup.fill("Why?")
    page.get_by_role("button", name="Continue both").click()
    expect(better).to_be_visible(timeout=GENERATION_TIMEOUT_S * 1000)
    expect(followup).to_have_value("")
    for side in ("a", "b"):
        expect(page.locator(f"#compare-answer-{side} blockquote")).to_have_count(2)  # both questions, in each side's history
        expect(page.locator(f"#compare-answer-{side} blockquote").last).to_contain_text("You: Why?")
    votes = [page.get_by_role("button", name=label, exact=True) for label in ("A is better", "B is better", "Tie", "Both bad")]
    for button in votes:
        expect(button).to_be_enabled()  # a new pair: the votes open again
    tab.shot("32-compare-continued")
    page.get_by_role("button", name="B is better", exact=True).click()
    expect(page.get_by_text(re.compile(r"Vote recorded: you chose B is better"))).to_be_visible()
    wait_until(lambda: len(pair_ids(runtime)) == 2, what="the second turn's vote in SQLite")
    second = pair_ids(runtime)[1]
    assert second[2] == "B"
    for side in (0, 1):
        row = runtime.store.get_response(second[side])
        earlier = runtime.store.get_response(first[side])
        assert row["parent_id"] == first[side]
        assert row["prompt"] == [
            *earlier["prompt"],
            {"role": "assistant", "content": earlier["text"]},
            {"role": "user", "content": "Why?"},
        ]

    # Enter in the follow-up continues too, and Stop ends both continued answers.
    hold_until_stopped(runtime, monkeypatch, "stream")
    followup.fill("Go on")
    followup.press("Enter")
    expect(stop).to_be_visible()  # the continuation goes on in the pair's own state: Stop finds it at once
    stop.click()
    expect(better).to_be_visible(timeout=GENERATION_TIMEOUT_S * 1000)
    page.get_by_role("button", name="Tie", exact=True).click()
    expect(page.get_by_text(re.compile(r"Vote recorded: you chose Tie"))).to_be_visible()
    wait_until(lambda: len(pair_ids(runtime)) == 3, what="the third turn's vote in SQLite")
    third = pair_ids(runtime)[2]
    ended = [runtime.store.get_response(third[side])["finish_reason"] for side in (0, 1)]
    assert ended == ["cancelled", "cancelled"]
    asked = [
        m["content"]
        for m in json.loads(runtime.store.db.execute("select prompt_json from preferences order by rowid desc").fetchone()[0])
    ]
    assert asked[-1] == "Go on" and asked[0] == "Tell me a long story"
    tab.shot("33-compare-continued-stopped-voted")
    assert tab.dialogs == [] and tab.page_errors == [] and tab.blocked == []

"""Browser fuzz: many multi-turn conversations whose questions *and answers* hold the text that
browsers and Markdown renderers re-shape (tabs, indented code, lists, tables, emoji, right-to-left
script, very long words). Every turn must be accepted, every 👍/👎 and its removal must land in
SQLite as the page shows it, and no error toast may appear.

The tiny model's answers are noise, so each recorded answer gets a fuzz piece appended (the
server streams, records and shows it like any answer). Seeded: a failure replays exactly.
Short answers keep the whole run to about a minute or two on a small machine.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from typing import Any

import pytest
from conftest import wait_until
from test_browser import Tab, browser, require_browser, send_chat, tab  # noqa: F401 - browser and tab are fixtures

CONVERSATIONS = 20
SEED = 20
PIECES = [
    "col one\tcol two\tcol three",
    "Fix this code:\n\n    def f(x):\n    \treturn x  # a tab inside an indented block\n\nThanks",
    "```python\nclass A:\n    def b(self):\n\t\treturn 1\n```",
    "- first\n  - nested item\n    - deeper\n1. one\n2. two",
    "| name | value |\n|------|-------|\n| a\tb | 1 |\n| ✓ | 2 |",
    "Emoji: 👍🏽 🇫🇷 👨‍👩‍👧 🧪 ✨",
    "مرحبا بالعالم — שלום עולם — mixed RTL and LTR",
    "A very long word: " + "supercalifragilistic" * 12,
    "    indented first line\n        more indented\n  less",
    "> a quote\n>\n>     with code inside",
    "trailing spaces   \n\n\n\nafter blank lines\t",
]


@pytest.fixture
def settings(settings):
    """Six-token answers (the fuzz is in the text around them, and the run stays short); the
    per-minute vote limits are an abuse guard, not under test here."""
    limits = dataclasses.replace(settings.limits, votes_per_minute=10_000, votes_per_minute_per_ip=10_000)
    return dataclasses.replace(settings, sampling=dataclasses.replace(settings.sampling, max_new_tokens=6), limits=limits)


@dataclasses.dataclass
class Turn:
    question: str
    marker: str


def conversations(rng: random.Random) -> list[list[Turn]]:
    """Seeded conversations of 3–5 turns; each question holds one or two fuzz pieces and a
    marker word that finds its recorded answer in SQLite."""
    plan = []
    for c in range(CONVERSATIONS):
        turns = []
        for t in range(rng.randint(3, 5)):
            pieces = rng.sample(PIECES, rng.randint(1, 2))
            marker = f"mark{c}x{t}"
            turns.append(Turn(f"{marker} " + "\n\n".join(pieces), marker))
        plan.append(turns)
    return plan


def fuzz_answers(runtime: Any, monkeypatch: Any, rng: random.Random) -> None:
    """Each finished answer gets a fuzz piece appended (as if the model had written it)."""
    from rlhf_demo.serving import Generation

    original = runtime.server.stream

    def stream(*args: Any, **kwargs: Any) -> Any:
        for item in original(*args, **kwargs):
            if isinstance(item, Generation):
                item = dataclasses.replace(item, text=f"{item.text}\n\n{rng.choice(PIECES)}")
            yield item

    monkeypatch.setattr(runtime.server, "stream", stream)


def answer_id(runtime: Any, marker: str) -> str:
    """The recorded answer to the question that holds ``marker``."""
    rows = runtime.store.db.execute("select id, prompt_json from responses order by rowid").fetchall()
    (found,) = [rid for rid, prompt in rows if re.match(rf"{marker}\b", json.loads(prompt)[-1]["content"])]
    return found


def vote_value(runtime: Any, response_id: str) -> int | None:
    row = runtime.store.db.execute("select value from ratings where response_id = ?", (response_id,)).fetchone()
    return row[0] if row else None


def thumb(page: Any, log: Any, runtime: Any, turn: Turn, label: str, keep: bool) -> None:
    """Click 👍 or 👎 on the last answer and check SQLite; unless ``keep``, click it again and
    check the vote is gone from SQLite, as the page says."""
    from playwright.sync_api import expect

    response = answer_id(runtime, turn.marker)
    log.get_by_role("button", name=label, exact=True).last.click()
    value = 1 if label == "Like" else -1
    wait_until(lambda: vote_value(runtime, response) == value, what=f"the {label} on {turn.marker} in SQLite")
    expect(log.get_by_role("button", name=f"{label}d", exact=True)).to_have_count(1)
    if not keep:
        log.get_by_role("button", name=f"{label}d", exact=True).click()
        expect(page.locator("#chat-vote-status")).to_contain_text("Vote removed.")
        wait_until(lambda: vote_value(runtime, response) is None, what=f"the {label} on {turn.marker} removed")


def test_fuzzed_multi_turn_conversations_in_a_real_browser(tab: Tab, app_url: str, runtime, monkeypatch) -> None:  # noqa: F811
    require_browser()
    from playwright.sync_api import expect

    rng = random.Random(SEED)
    plan = conversations(rng)
    fuzz_answers(runtime, monkeypatch, rng)
    page = tab.page
    page.goto(app_url)
    log = page.get_by_role("log", name="chatbot conversation")
    answered = 0
    for c, turns in enumerate(plan):
        removed_at, kept_at = rng.randrange(len(turns) - 1), len(turns) - 1
        for t, turn in enumerate(turns):
            send_chat(page, turn.question)
            answered += 1
            expect(log.get_by_test_id("bot")).to_have_count(t + 1)
            expect(log.get_by_test_id("user").last).to_contain_text(turn.marker)
            wait_until(lambda n=answered: runtime.store.counts()["responses"] == n, what=f"answer {c}.{t} in SQLite")
            if t in (removed_at, kept_at):
                thumb(page, log, runtime, turn, rng.choice(["Like", "Dislike"]), keep=t == kept_at)
            assert tab.error_toasts() == [], f"conversation {c}, turn {t}: {tab.error_toasts()}"
        if c % 5 == 0:
            tab.shot(f"fuzz-{c:02d}")
        page.get_by_role("button", name="Clear", exact=True).click()
        expect(log.get_by_test_id("bot")).to_have_count(0)
    counts = runtime.store.counts()
    assert counts["responses"] == sum(len(t) for t in plan)
    assert counts["thumbs_up"] + counts["thumbs_down"] == CONVERSATIONS  # one kept vote each; the removed ones are gone
    conversations_stored = runtime.store.db.execute("select count(distinct conversation_id) from responses").fetchone()[0]
    assert conversations_stored == CONVERSATIONS
    assert tab.dialogs == [] and tab.page_errors == [] and tab.blocked == []

"""Compare's "continue both" without a browser: each side answers a follow-up from its own
conversation, each turn's pair is its own vote, and hostile continuations write nothing."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from rlhf_demo.store import UnknownIdError
from rlhf_demo.ui.handlers import Handlers, PairState, UserError
from rlhf_demo.ui.handlers.base import OWNER_REFUSAL
from rlhf_demo.ui.handlers.continuation import NOT_A_PAIR

ME, OTHER = "visitor-me", "visitor-other"
SAMPLES = "Two samples of the active policy"


@pytest.fixture
def handlers(runtime) -> Handlers:
    return Handlers(runtime)


def rows(runtime: Any) -> tuple[int, int]:
    db = runtime.store.db
    return db.execute("select count(*) from responses").fetchone()[0], db.execute("select count(*) from preferences").fetchone()[
        0
    ]


def continued(handlers: Handlers, state: Any, text: str = "And why?", visitor: str = ME) -> tuple[str, str, PairState]:
    *_, last = handlers.continue_stream(visitor, text, state, max_new_tokens=6)
    return last


def test_each_side_continues_its_own_conversation_and_each_turn_is_its_own_vote(handlers, runtime):
    a1, b1, state = handlers.compare(ME, "Name a colour", SAMPLES, max_new_tokens=6)
    first = state.response_ids
    handlers.vote_pair(ME, state, "A is better")

    a2, b2, state = continued(handlers, state)
    assert state.response_ids is not None and set(state.response_ids).isdisjoint(first)
    assert not state.voted and not state.generating and state.question == "And why?"
    for side, (answer, earlier) in enumerate(((a1, first[0]), (b1, first[1]))):
        row = runtime.store.get_response(state.response_ids[side])
        assert row["prompt"] == [
            {"role": "user", "content": "Name a colour"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And why?"},
        ]
        assert row["parent_id"] == earlier
        assert state.earlier[side] == row["prompt"][:2]
    assert (
        runtime.store.get_response(state.response_ids[0])["text"],
        runtime.store.get_response(state.response_ids[1])["text"],
    ) == (
        a2,
        b2,
    )

    said, state = handlers.vote_pair(ME, state, "B is better")
    assert said.startswith("Vote recorded: you chose **B is better**.")
    votes = runtime.store.db.execute("select response_a_id, response_b_id, outcome from preferences order by rowid").fetchall()
    assert votes == [(*first, "A"), (*state.response_ids, "B")]
    # the continued pair has no one prompt: its vote is kept, but it is not a training pair
    assert [p["chosen"] for p in runtime.store.preference_pairs()] == [a1]


def test_a_pair_can_be_continued_before_its_vote_and_again(handlers, runtime):
    _, _, state = handlers.compare(ME, "Hi", SAMPLES, max_new_tokens=4)
    continued(handlers, state, "Tell me more")
    _, _, state = continued(handlers, state, "Thanks")
    row = runtime.store.get_response(state.response_ids[1])
    assert [m["content"] for m in row["prompt"] if m["role"] == "user"] == ["Hi", "Tell me more", "Thanks"]
    assert rows(runtime) == (6, 0)  # three turns of two answers, no vote until the visitor gives one
    handlers.vote_pair(ME, state, "Both bad")
    assert rows(runtime) == (6, 1)


def test_stop_ends_both_continued_answers_and_they_can_be_voted_on(handlers, runtime):
    _, _, state = handlers.compare(ME, "Hi", SAMPLES, max_new_tokens=4)
    stream = handlers.continue_stream(ME, "A long story, please", state, max_new_tokens=200)
    _, _, state = next(stream)
    assert state.generating
    with pytest.raises(UserError, match="Wait until both answers are finished"):
        handlers.vote_pair(ME, state, "A is better")
    handlers.stop_pair(state)
    *_, (a, b, state) = stream
    ended = [runtime.store.get_response(i)["finish_reason"] for i in state.response_ids]
    assert ended == ["cancelled", "cancelled"]
    assert handlers.vote_pair(ME, state, "Tie")[0].startswith("Vote recorded")


def test_the_turn_limit_holds_for_a_continued_pair(handlers, runtime):
    handlers.limits = dataclasses.replace(handlers.limits, max_turns=2)
    _, _, state = handlers.compare(ME, "Hi", SAMPLES, max_new_tokens=2)
    continued(handlers, state)
    before = rows(runtime)
    with pytest.raises(UserError, match="reached 2 turns"):
        continued(handlers, state)
    assert rows(runtime) == before


def forged(ids: tuple[str, str]) -> PairState:
    return PairState(response_ids=ids, versions=("v0", "v0"))


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("other-visitors-pair", UserError, OWNER_REFUSAL[:30]),
        ("forged-id", UnknownIdError, "unknown response"),
        ("stale-pair-after-delete", UnknownIdError, "unknown response"),
        ("answers-of-two-rounds", UserError, NOT_A_PAIR),
        ("empty-prompt", UserError, "The message is empty"),
        ("prompt-not-text", UserError, "A message must be text"),
        ("no-pair-yet", UserError, "Generate a pair first"),
        ("state-none", UserError, "Generate a pair first"),
        ("while-generating", UserError, "Wait until both answers are finished"),
        ("nan-temperature", UserError, "finite number"),
    ],
)
def test_a_hostile_continuation_is_refused_and_writes_nothing(handlers, runtime, case, error, message):
    _, _, mine = handlers.compare(ME, "Hi", SAMPLES, max_new_tokens=2)
    _, _, again = handlers.compare(ME, "Bye", SAMPLES, max_new_tokens=2)
    _, _, theirs = handlers.compare(OTHER, "Hi", SAMPLES, max_new_tokens=2)
    assert mine.response_ids and again.response_ids and theirs.response_ids
    visitor, text, state, sampling = ME, "Go on", mine, {"max_new_tokens": 2}
    if case == "other-visitors-pair":
        state = theirs
    elif case == "forged-id":
        state = forged(("f" * 32, mine.response_ids[1]))
    elif case == "stale-pair-after-delete":
        handlers.delete_my_data(OTHER)
        state = theirs
    elif case == "answers-of-two-rounds":
        state = forged((mine.response_ids[0], again.response_ids[1]))
    elif case in ("empty-prompt", "prompt-not-text"):
        text = "  \n\t " if case == "empty-prompt" else ["Go on"]  # type: ignore[assignment]
    elif case in ("no-pair-yet", "state-none"):
        state = PairState() if case == "no-pair-yet" else None  # type: ignore[assignment]
    elif case == "while-generating":
        state = dataclasses.replace(mine, generating=True)
    elif case == "nan-temperature":
        sampling = {"temperature": float("nan")}
    before = rows(runtime)
    with pytest.raises(error, match=message):
        list(handlers.continue_stream(visitor, text, state, **sampling))
    assert rows(runtime) == before


def turn(role: str, text: str) -> dict[str, str]:
    return {"role": role, "content": text}


@pytest.mark.parametrize(
    ("a", "b", "pair"),
    [
        ([turn("user", "Hi")], [turn("user", "Hi")], True),
        ([turn("user", "Hi")], [turn("user", "Bye")], False),
        (
            [turn("user", "Hi"), turn("assistant", "A1"), turn("user", "Why?")],
            [turn("user", "Hi"), turn("assistant", "B1"), turn("user", "Why?")],
            True,
        ),  # each side's own earlier answer
        (
            [turn("user", "Hi"), turn("assistant", "A1"), turn("user", "Why?")],
            [turn("user", "Yo"), turn("assistant", "B1"), turn("user", "Why?")],
            False,
        ),  # an earlier question differs
        (
            [turn("user", "Why?"), turn("assistant", "A2"), turn("user", "Go on")],
            [turn("user", "Hi"), turn("assistant", "B1"), turn("user", "Why?"), turn("assistant", "B2"), turn("user", "Go on")],
            True,
        ),  # A's longer answers had its oldest exchange dropped to fit the prompt budget
        (
            [turn("assistant", "Why?"), turn("user", "Go on")],
            [turn("user", "Why?"), turn("user", "Go on")],
            False,
        ),
        ([], [turn("user", "Hi")], False),
    ],
)
def test_a_pair_answers_the_same_questions_whatever_each_side_said_before(a, b, pair):
    from rlhf_demo.store.votes import same_questions

    assert same_questions(a, b) is pair and same_questions(b, a) is pair


def test_a_continuation_that_fails_midway_leaves_nothing_to_vote_on_and_one_refused_first_keeps_the_pair(
    handlers, runtime, monkeypatch
):
    """Failed after answers were shown (here: the store refuses the record), the pair on screen
    was never recorded: a vote must not land on the pair before it. Refused before a token,
    the page still shows the pair before, and it stays votable."""
    from rlhf_demo.modeling.adapters import AdapterError
    from rlhf_demo.store import StoreBusyError
    from rlhf_demo.ui.handlers.continuation import VERSION_GONE

    def evicted(*args: Any, **kwargs: Any) -> Any:
        raise AdapterError("adapter 'v0' is not loaded")
        yield  # a generator, as the server's stream is

    _, _, state = handlers.compare(ME, "Hi", SAMPLES, max_new_tokens=2)
    pair = state.response_ids
    with monkeypatch.context() as m:
        m.setattr(runtime.server, "stream", evicted)
        with pytest.raises(UserError, match=VERSION_GONE):
            continued(handlers, state)
    assert state.response_ids == pair and state.earlier == ([], []) and state.question == "Hi"
    assert handlers.vote_pair(ME, state, "A is better")[0].startswith("Vote recorded")

    def busy(*args: Any, **kwargs: Any) -> str:
        raise StoreBusyError("the database is busy; please try again")

    monkeypatch.setattr(handlers, "record", busy)
    with pytest.raises(StoreBusyError):
        continued(handlers, state)
    assert state.response_ids is None and not state.generating
    with pytest.raises(UserError, match="Generate a pair first"):
        handlers.vote_pair(ME, state, "B is better")
    assert rows(runtime) == (2, 1)


def test_an_indented_answer_keeps_its_indentation_on_screen():
    """Gradio's Markdown dedents what it shows (``inspect.cleandoc``): an answer that is all
    indented code lost its indentation, and with it the code block."""
    import gradio as gr

    from rlhf_demo.ui.compare import side_markdown

    answer = "    def f():\n        return 1"
    first = PairState(response_ids=("a", "b"), question="Fix it")
    shown = gr.Markdown().postprocess(side_markdown("A", answer, first))
    assert "\n    def f():\n        return 1" in shown
    later = dataclasses.replace(first, earlier=([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\tx"}], []))
    assert "\n    def f():\n        return 1" in gr.Markdown().postprocess(side_markdown("A", answer, later))

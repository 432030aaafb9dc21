"""Tests for rlhf_demo.store, training data: pairs, thumb examples, prompts, votes since."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from rlhf_demo.store import FeedbackStore, InvalidInputError
from tests import store_fixtures
from tests.store_fixtures import OTHER_PROMPT, PROMPT, respond

db_path = store_fixtures.db_path  # the fixture, usable in this module
store = store_fixtures.store  # the fixture, usable in this module


def test_training_data_says_which_answers_were_cut_at_the_length_limit(store: FeedbackStore) -> None:
    ended, cut = respond(store, "Blue."), respond(store, "The sky is blue because", finish_reason="length")
    store.prefer(visitor_id="s1", response_a_id=cut, response_b_id=ended, outcome="B", source="two_samples")
    store.rate("s1", cut, -1)
    (pair,) = store.preference_pairs()
    assert (pair["chosen"], pair["chosen_finished"], pair["rejected_finished"]) == ("Blue.", True, False)
    (thumb,) = store.thumb_examples()
    assert (thumb["completion"], thumb["finished"], thumb["label"]) == ("The sky is blue because", False, False)


def test_an_answer_stopped_by_the_visitor_is_not_finished(store: FeedbackStore) -> None:
    """Stop ends an answer without an end-of-turn marker, like the length limit."""
    stopped = respond(store, "Once upon a", finish_reason="cancelled")
    store.rate("s1", stopped, 1)
    (thumb,) = store.thumb_examples()
    assert (thumb["completion"], thumb["finished"]) == ("Once upon a", False)
    store.prefer(visitor_id="s1", response_a_id=stopped, response_b_id=respond(store, "Blue."), outcome="A", source="two_samples")
    (pair,) = store.preference_pairs()
    assert (pair["chosen_finished"], pair["rejected_finished"]) == (False, True)


def test_prefer_round_trip_and_training_data(store: FeedbackStore) -> None:
    a, b = respond(store, "Blue."), respond(store, "I cannot answer.")
    store.prefer(
        visitor_id="s1",
        response_a_id=a,
        response_b_id=b,
        outcome="A",
        source="two_samples",
    )
    store.prefer(
        visitor_id="s2",
        response_a_id=a,
        response_b_id=b,
        outcome="B",
        source="two_versions",
    )
    store.prefer(
        visitor_id="s4",  # one vote per pair per voter: s2 voting again would update
        response_a_id=a,
        response_b_id=b,
        outcome="tie",
        source="two_samples",
    )
    store.prefer(
        visitor_id="s3",
        response_a_id=a,
        response_b_id=b,
        outcome="both_bad",
        source="two_samples",
    )
    store.rate("s1", a, 1)

    pairs = store.preference_pairs()
    assert pairs == [
        {
            "prompt": PROMPT,
            "chosen": "Blue.",
            "rejected": "I cannot answer.",
            "chosen_finished": True,
            "rejected_finished": True,
            "visitor_id": "s1",
            "ip_key": None,
            "reasons": [],
            "comment": "",
        },
        {
            "prompt": PROMPT,
            "chosen": "I cannot answer.",
            "rejected": "Blue.",
            "chosen_finished": True,
            "rejected_finished": True,
            "visitor_id": "s2",
            "ip_key": None,
            "reasons": [],
            "comment": "",
        },
    ]
    thumbs = store.thumb_examples()
    assert [(t["completion"], t["label"], t["visitor_id"]) for t in thumbs] == [
        ("Blue.", False, "s3"),
        ("I cannot answer.", False, "s3"),
        ("Blue.", True, "s1"),
    ]
    assert all(t["prompt"] == PROMPT for t in thumbs)
    assert store.counts() == {
        "responses": 2,
        "thumbs_up": 1,
        "thumbs_down": 0,
        "preferences": 2,
        "ties": 1,
        "both_bad": 1,
        "visitors": 4,
    }
    assert store.votes_per_visitor() == [2, 1, 1, 1]


def test_count_votes_since_and_recent_prompts(store: FeedbackStore) -> None:
    a, b = respond(store), respond(store, "Red.")
    assert store.count_votes_since(None) == 0
    store.rate("s1", a, 1)
    mark = store.get_response(b)["created_at"]
    store.prefer(
        visitor_id="s1",
        response_a_id=a,
        response_b_id=b,
        outcome="A",
        source="two_samples",
    )
    assert store.count_votes_since(None) == 2
    assert store.count_votes_since(mark) == 2
    cutoff = datetime.now(UTC).isoformat()
    store.rate("s1", a, -1)  # a changed vote is new feedback
    assert store.count_votes_since(cutoff) == 1
    assert store.count_votes_since("2999-01-01T00:00:00") == 0  # naive means UTC
    with pytest.raises(InvalidInputError):
        store.count_votes_since("yesterday")

    respond(store, prompt=OTHER_PROMPT)
    # PROMPT carries a system turn no visitor's recorded chat has: never a PPO prompt.
    assert store.recent_prompts(10) == [OTHER_PROMPT]
    third = [{"role": "user", "content": "Name a tree."}]
    respond(store, prompt=third)
    assert store.recent_prompts(1) == [third]

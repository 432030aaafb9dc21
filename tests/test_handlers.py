"""UI handlers without a browser: every vote lands in SQLite; bad input is refused, writes nothing."""

from __future__ import annotations

import sqlite3

import pytest

from rlhf_demo.store import StoreError
from rlhf_demo.ui.handlers import ChatState, Handlers, PairState, UserError
from rlhf_demo.ui.handlers.checks import check_message

SESSION = "session-1"


@pytest.fixture
def handlers(runtime) -> Handlers:
    return Handlers(runtime)


def chat_once(handlers: Handlers, state: ChatState, text: str = "Hello", chat=None) -> list[dict]:
    *_, final = handlers.chat(SESSION, text, chat or [], state, 0.7, 0.9, 8)
    return final


def table_count(runtime, table: str) -> int:
    con = sqlite3.connect(runtime.settings.db_path)
    try:
        return con.execute(f"select count(*) from {table}").fetchone()[0]
    finally:
        con.close()


def test_chat_records_response_with_exact_prompt_and_version(handlers, runtime):
    state = ChatState()
    final = chat_once(handlers, state, "Hello there")
    assert final[-1]["role"] == "assistant" and "adapter v0" in final[-1]["content"]
    ((index, response_id),) = state.response_ids.items()
    assert index == 1
    stored = runtime.store.get_response(response_id)
    assert stored["prompt"] == [{"role": "user", "content": "Hello there"}]
    assert stored["adapter_version"] == "v0"
    assert stored["completion_tokens"] > 0


def test_second_turn_sends_history_without_display_tags(handlers, runtime):
    state = ChatState()
    first = chat_once(handlers, state, "Hi")
    chat_once(handlers, state, "And then?", chat=first)
    prompt = runtime.store.get_response(state.response_ids[3])["prompt"]
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    assert "adapter" not in prompt[1]["content"]
    assert prompt[1]["content"] == runtime.store.get_response(state.response_ids[1])["text"]
    assert first[1]["content"].startswith(prompt[1]["content"])


def test_like_lands_in_db_changes_and_is_removed(handlers, runtime):
    state = ChatState()
    chat_once(handlers, state)
    assert handlers.like(SESSION, state, 1, True) == "👍 recorded."
    assert runtime.store.counts()["thumbs_up"] == 1
    handlers.like(SESSION, state, 1, "Dislike")
    counts = runtime.store.counts()
    assert (counts["thumbs_up"], counts["thumbs_down"]) == (0, 1)
    assert handlers.like(SESSION, state, 1, None) == "Vote removed."
    assert table_count(runtime, "ratings") == 0


def test_reasons_go_with_the_last_thumbs_down_and_land_in_the_db(handlers, runtime):
    state = ChatState()
    with pytest.raises(UserError, match="Vote 👎 on an answer first"):
        handlers.thumb_reasons(SESSION, state, ["wrong"], "")
    chat_once(handlers, state)
    handlers.like(SESSION, state, 1, "Dislike")
    assert handlers.thumb_reasons(SESSION, state, ["too long", "wrong"], "Off topic.").startswith("Thanks")
    (example,) = runtime.store.thumb_examples()
    assert (example["label"], example["reasons"], example["comment"]) == (False, ["wrong", "too long"], "Off topic.")
    with pytest.raises(StoreError, match="unknown reason 'lol'"):
        handlers.thumb_reasons(SESSION, state, ["lol"], "")
    handlers.like(SESSION, state, 1, True)  # a 👍 takes no reasons
    with pytest.raises(UserError, match="Vote 👎 on an answer first"):
        handlers.thumb_reasons(SESSION, state, ["wrong"], "")
    with pytest.raises(StoreError, match="vote 👎 on this answer first"):
        handlers.thumb_reasons("someone-else", ChatState(disliked=state.response_ids[1]), ["wrong"], "")


def test_pair_reasons_need_the_vote_and_land_in_the_db(handlers, runtime):
    _, _, state = handlers.compare(SESSION, "Say hi", "Two samples of the active policy", max_new_tokens=4)
    with pytest.raises(UserError, match="Vote on a pair first"):
        handlers.pair_reasons(SESSION, state, ["rude"], "")
    _, state = handlers.vote_pair(SESSION, state, "Both bad")
    handlers.pair_reasons(SESSION, state, ["rude", "unsafe"], "Both are curt.")
    assert {(tuple(e["reasons"]), e["comment"]) for e in runtime.store.thumb_examples()} == {
        (("unsafe", "rude"), "Both are curt.")
    }
    assert handlers.pair_reasons(SESSION, state, [], "") == "Reasons removed from your vote."


def test_compare_vote_lands_in_db_and_reveals_versions(handlers, runtime):
    a, b, state = handlers.compare(SESSION, "Say hi", "Two samples of the active policy", max_new_tokens=8)
    assert isinstance(a, str) and isinstance(b, str)
    message, state = handlers.vote_pair(SESSION, state, "B is better")
    assert "v0" in message and state.voted
    (pair,) = runtime.store.preference_pairs()
    assert pair["chosen"] == b and pair["rejected"] == a
    message, state = handlers.vote_pair(SESSION, state, "A is better")  # a second vote changes the first
    assert message.startswith("Vote changed: you chose **A is better**.")
    (pair,) = runtime.store.preference_pairs()
    assert pair["chosen"] == a
    assert handlers.vote_pair(SESSION, state, "A is better")[0].startswith(
        "That vote was already recorded: you chose **A is better**."
    )
    assert table_count(runtime, "preferences") == 1


def test_compare_streams_both_answers_and_refuses_a_vote_until_they_are_recorded(handlers, runtime):
    stream = handlers.compare_stream(SESSION, "Say hi", "Two samples of the active policy", max_new_tokens=12)
    a, b, state = next(stream)
    assert state.generating and isinstance(a, str) and isinstance(b, str)
    with pytest.raises(UserError, match="Wait until both answers"):
        handlers.vote_pair(SESSION, state, "A is better")
    progress = [next(stream)]
    progress.extend(stream)
    final_a, final_b, state = progress[-1]
    assert not state.generating and state.versions == ("v0", "v0") and table_count(runtime, "responses") == 2
    assert [runtime.store.get_response(i)["text"] for i in state.response_ids] == [final_a, final_b]
    assert handlers.vote_pair(SESSION, state, "Tie")[0].startswith("Vote recorded: you chose **Tie**.")
    fresh = handlers.new_round(state)
    assert fresh.response_ids is None and not fresh.voted
    with pytest.raises(UserError, match="Generate a pair first"):
        handlers.vote_pair(SESSION, fresh, "A is better")
    assert table_count(runtime, "preferences") == 1


def test_compare_versions_needs_a_previous_version(handlers):
    with pytest.raises(UserError, match="no previous version"):
        handlers.compare(SESSION, "Hi", "Active vs previous version")


@pytest.mark.parametrize(
    "message",
    ["", "   \n\t ", "x" * 5000, None, 42, b"bytes", "nul\x00byte", ["list"]],
    ids=["empty", "blank", "too-long", "none", "int", "bytes", "nul", "list"],
)
def test_bad_messages_are_refused_and_write_nothing(handlers, runtime, message):
    with pytest.raises(UserError):
        list(handlers.chat(SESSION, message, [], ChatState()))
    with pytest.raises(UserError):
        handlers.compare(SESSION, message, "Two samples of the active policy")
    assert table_count(runtime, "responses") == 0


def test_control_characters_are_stripped(runtime):
    assert check_message("a\x07b\x1bc\n", runtime.settings.limits) == "abc"


@pytest.mark.parametrize(
    ("index", "liked"),
    [(0, True), (7, True), ("1", True), (None, False), (1.5, True)],
    ids=["user-message", "unknown-index", "str-index", "none-index", "float-index"],
)
def test_votes_on_unknown_answers_are_refused(handlers, runtime, index, liked):
    state = ChatState()
    chat_once(handlers, state)
    with pytest.raises(UserError):
        handlers.like(SESSION, state, index, liked)
    assert table_count(runtime, "ratings") == 0


def test_pair_vote_without_pair_or_with_bad_outcome_is_refused(handlers, runtime):
    with pytest.raises(UserError, match="Generate a pair first"):
        handlers.vote_pair(SESSION, PairState(), "A is better")
    _, _, state = handlers.compare(SESSION, "Hi", "Two samples of the active policy", max_new_tokens=4)
    with pytest.raises(UserError, match="Unknown outcome"):
        handlers.vote_pair(SESSION, state, "C is better")
    with pytest.raises(UserError, match="No visitor"):
        handlers.vote_pair("", state, "A is better")
    assert table_count(runtime, "preferences") == 0


def test_vote_rate_limit_per_visitor(handlers, runtime):
    handlers.votes.limit = 3
    state = ChatState()
    chat_once(handlers, state)
    for liked in (True, False, True):
        handlers.like(SESSION, state, 1, liked)
    with pytest.raises(UserError, match="Too many votes"):
        handlers.like(SESSION, state, 1, False)
    assert runtime.store.counts()["thumbs_up"] == 1
    other = ChatState()
    *_, final = handlers.chat("another-visitor", "Hi", [], other, 0.7, 0.9, 4)
    handlers.like("another-visitor", other, 1, False)  # other visitors are not affected


def test_turn_limit(handlers):
    handlers.limits = type(handlers.limits)(max_turns=1)
    state = ChatState()
    first = chat_once(handlers, state)
    with pytest.raises(UserError, match="turns"):
        chat_once(handlers, state, "again", chat=first)


def test_locked_database_gives_clear_error_and_keeps_the_vote_retryable(handlers, runtime):
    state = ChatState()
    chat_once(handlers, state)
    runtime.store.db.execute("PRAGMA busy_timeout = 50")
    blocker = sqlite3.connect(runtime.settings.db_path, timeout=0.05)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="(?i)busy|locked"):
            handlers.like(SESSION, state, 1, True)
    finally:
        blocker.rollback()
        blocker.close()
    assert table_count(runtime, "ratings") == 0
    handlers.like(SESSION, state, 1, True)
    assert table_count(runtime, "ratings") == 1


def test_undo_and_retry(handlers, runtime):
    state = ChatState()
    first = chat_once(handlers, state, "Question one")
    chat, last = handlers.undo(first, state, 1)
    assert chat == [] and last == "Question one" and state.response_ids == {}
    with pytest.raises(UserError, match="Nothing to retry"):  # the page's copy from before the undo
        list(handlers.retry(SESSION, first, state, 1, temperature=0.7, max_new_tokens=6))
    again = chat_once(handlers, state, last)
    assert again[0]["content"] == "Question one" and 1 in state.response_ids
    assert table_count(runtime, "responses") == 2  # the first answer stays stored


def test_retry_with_the_user_message_index_as_gradio_sends_it(handlers, runtime):
    """Gradio 6's Chatbot retry sends the index of the *user* message (gr.RetryData.index)."""
    state = ChatState()
    first = chat_once(handlers, state, "Question one")
    second = chat_once(handlers, state, "Question two", chat=first)
    *_, again = handlers.retry(SESSION, second, state, 2, temperature=0.7, max_new_tokens=6)
    assert [m["role"] for m in again] == ["user", "assistant", "user", "assistant"]
    assert again[2]["content"] == "Question two" and "adapter v0" in again[3]["content"]
    assert set(state.response_ids) == {1, 3} and table_count(runtime, "responses") == 3
    *_, first_again = handlers.retry(SESSION, again, state, 0, temperature=0.7, max_new_tokens=6)
    assert [m["content"] for m in first_again[:1]] == ["Question one"] and len(first_again) == 2
    assert set(state.response_ids) == {1}
    *_, more = handlers.chat(SESSION, "Question three", first_again, state, 0.7, 0.9, 4)  # the record still matches
    assert len(more) == 4


def test_stop_keeps_the_answer_so_far_recorded_and_the_chat_goes_on(handlers, runtime):
    state = ChatState()
    stream = handlers.chat(SESSION, "Tell me a long story", [], state, 0.7, 0.9, 200)
    next(stream)  # the question is shown; the visitor presses Stop before the first words arrive
    assert handlers.stop(state) == ""
    *_, final = stream
    assert "adapter v0" in final[-1]["content"]
    stored = runtime.store.get_response(state.response_ids[1])
    assert stored["finish_reason"] == "cancelled" and stored["completion_tokens"] < 200
    assert handlers.like(SESSION, state, 1, False) == "👎 recorded."
    more = chat_once(handlers, state, "Go on", chat=final)  # the next answer is not stopped
    assert runtime.store.get_response(state.response_ids[3])["finish_reason"] != "cancelled"
    assert len(more) == 4


def test_stop_refuses_a_forged_state(handlers):
    with pytest.raises(UserError):
        handlers.stop({"stop_requested": True})


@pytest.mark.parametrize("index", [-1, 9, 1.5, "0", True, None])
def test_retry_refuses_bad_indexes(handlers, runtime, index):
    state = ChatState()
    first = chat_once(handlers, state, "Question one")
    with pytest.raises(UserError):
        list(handlers.retry(SESSION, first, state, index))
    assert table_count(runtime, "responses") == 1


def test_export_with_visitor_ids_needs_admin(handlers, runtime):
    with pytest.raises(UserError, match="admin"):
        handlers.export("preferences", include_visitor_ids=True, admin_token="guess")
    path = handlers.export("preferences")
    assert path.endswith("preferences.jsonl")


def test_delete_my_data(handlers, runtime):
    state = ChatState()
    chat_once(handlers, state)
    handlers.like(SESSION, state, 1, True)
    handlers.delete_my_data(SESSION)
    assert table_count(runtime, "ratings") == 0 and table_count(runtime, "responses") == 0


def test_version_tag_closes_a_code_block_cut_off_by_the_length_limit():
    """The tag must render as a tag, and the model must see its own text back unchanged."""
    from rlhf_demo.ui.handlers import tag_version

    for answer in ("Here:\n```python\nprint('hi')", "Done:\n```\nx\n```", "plain answer"):
        shown = tag_version(answer, "v3")
        body = shown.rsplit("\n\n<sub>", 1)[0]
        fences = [line for line in body.splitlines() if line.lstrip().startswith("```")]
        assert len(fences) % 2 == 0, "the tag would sit inside an open code block"
        assert shown.endswith("<sub>written by adapter v3</sub>")
        assert shown.startswith(answer)


@pytest.mark.parametrize("picked_from", [1, 4])
def test_a_version_tag_reads_back_as_written(picked_from):
    """Benches read which version wrote an answer from its tag; a best-of-n answer's tag
    ("…, picked from 4") read as "?" and the live loop could never see the new version."""
    from rlhf_demo.ui.handlers.chat import read_version_tag, tag_version

    answer = "Sure!\n\n- one\n- two 🎉"
    shown = tag_version(answer, "v12", picked_from)
    assert read_version_tag(shown) == (answer, "v12", picked_from)
    page_text = shown.replace("<sub>", "").replace("</sub>", "")  # what the browser shows
    assert read_version_tag(page_text) == (answer, "v12", picked_from)
    assert read_version_tag("no tag here") == ("no tag here", None, 1)


def test_the_reveal_repeats_the_choice(handlers):
    _, _, state = handlers.compare(SESSION, "Hi", "Two samples of the active policy", max_new_tokens=2)
    said, _ = handlers.vote_pair(SESSION, state, "B is better")
    assert said.startswith("Vote recorded: you chose **B is better**.") and "A was written by **v0**" in said


def test_the_header_names_the_model_without_server_paths_or_library_details(handlers, runtime):
    text = handlers.model_markdown()
    assert "tiny" in text and "v0" in text
    for secret in (
        str(runtime.settings.data_dir.resolve()),
        str(runtime.loaded.source.path),
        "float32",
        "compute on",
        "Data directory",
    ):
        assert secret not in text, secret


def test_stop_ends_both_compare_answers_and_they_can_be_voted_on(handlers, runtime):
    stream = handlers.compare_stream(SESSION, "Tell me a long story", "Two samples of the active policy", max_new_tokens=200)
    _, _, state = next(stream)
    handlers.stop_pair(state)
    *_, (_, _, state) = stream
    reasons = [runtime.store.get_response(i)["finish_reason"] for i in state.response_ids]
    assert reasons == ["cancelled", "cancelled"] and not state.generating
    assert handlers.vote_pair(SESSION, state, "Both bad")[0].startswith("Vote recorded")
    with pytest.raises(UserError, match="Nothing to stop"):
        handlers.stop_pair(state)


def test_the_vote_counter_says_how_many_of_your_votes_count_and_why(handlers, runtime):
    assert "none yet" in handlers.my_votes_markdown(SESSION)
    for n in range(3):
        state = ChatState()
        chat_once(handlers, state, f"Question {n}")
        handlers.like(SESSION, state, 1, True)
    assert "3 of your 3 vote examples count" in handlers.my_votes_markdown(SESSION)  # the only voter
    runtime.store.rate("someone-else", state.response_ids[1], -1)  # a second voter: an equal share each
    text = handlers.my_votes_markdown(SESSION)
    assert "1 of your 3 vote examples count" in text and "The newest count" in text

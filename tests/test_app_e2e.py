"""End to end: launch the app on 127.0.0.1 and drive it with gradio_client; votes become rows."""

from __future__ import annotations

import sqlite3

import pytest


def count(runtime, table: str) -> int:
    con = sqlite3.connect(runtime.settings.db_path)
    try:
        return con.execute(f"select count(*) from {table}").fetchone()[0]
    finally:
        con.close()


def test_chat_like_compare_vote_land_in_sqlite(app_url, runtime):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    chat, textbox = client.predict("Hello from the client", [], 0.7, 0.9, 8, api_name="/chat")
    assert chat[-1]["role"] == "assistant" and textbox == ""
    assert count(runtime, "responses") == 1

    status = client.predict(1, True, api_name="/rate")
    assert "recorded" in status
    assert runtime.store.counts()["thumbs_up"] == 1

    a, b, prompt_text = client.predict("Compare this", "Two samples of the active policy", 0.7, 0.9, 8, api_name="/compare")
    assert a.startswith("**A**") and b.startswith("**B**")
    reveal = client.predict(api_name="/vote_A")
    assert "A was written by" in reveal
    assert count(runtime, "preferences") == 1
    assert count(runtime, "responses") == 3


def test_bad_input_through_the_api_is_a_clear_error(app_url, runtime):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="empty"):
        client.predict("   ", [], 0.7, 0.9, 8, api_name="/chat")
    with pytest.raises(Exception, match="not a rated answer"):
        client.predict(5, True, api_name="/rate")
    with pytest.raises(Exception, match="Generate a pair first"):
        client.predict(api_name="/vote_tie")
    assert count(runtime, "responses") == 0 and count(runtime, "ratings") == 0

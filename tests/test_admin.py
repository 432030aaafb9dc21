"""The admin token cannot be guessed: long, not an example, and few tries per network."""

from __future__ import annotations

import dataclasses

import pytest

from rlhf_demo.admin import ATTEMPTS_PER_MINUTE, MIN_TOKEN_CHARS, token_problem
from rlhf_demo.ui.handlers import Handlers, UserError

TOKEN = "0123456789abcdef0123456789abcdef"


class FakeRequest:
    """The request Gradio sets in its context for every event (headers and the TCP peer)."""

    def __init__(self, host: str) -> None:
        self.headers: dict[str, str] = {}
        self.client = type("C", (), {"host": host})()


@pytest.fixture
def admin(runtime) -> Handlers:
    runtime.settings = dataclasses.replace(runtime.settings, admin_token=TOKEN)
    return Handlers(runtime)


def from_address(host: str, action, *args):
    """Run ``action`` as Gradio runs an event: with the request in its context."""
    from gradio.context import LocalContext

    reset = LocalContext.request.set(FakeRequest(host))
    try:
        return action(*args)
    finally:
        LocalContext.request.reset(reset)


def test_wrong_tokens_are_limited_per_network_then_even_the_right_one_is_refused(admin):
    for _ in range(ATTEMPTS_PER_MINUTE):
        with pytest.raises(UserError, match="needs the admin token"):
            from_address("203.0.113.9", admin.reset_to_base, "guess-guess-guess-guess")
    with pytest.raises(UserError, match="Too many wrong admin tokens"):
        from_address("203.0.113.9", admin.reset_to_base, TOKEN)  # a guesser learns nothing from the right one
    with pytest.raises(UserError, match="Too many"):
        from_address("203.0.113.9", admin.train_now, TOKEN)  # every admin action shares the count
    assert "Now serving" in from_address("198.51.100.1", admin.reset_to_base, TOKEN)  # another network is unaffected


def test_an_ipv6_guesser_cannot_rotate_addresses_within_its_64(admin):
    for i in range(ATTEMPTS_PER_MINUTE):
        with pytest.raises(UserError, match="needs the admin token"):
            from_address(f"2001:db8:5:6::{i + 1:x}", admin.train_now, "guess-guess-guess-guess")
    with pytest.raises(UserError, match="Too many"):
        from_address("2001:db8:5:6::ffff", admin.train_now, TOKEN)


def test_the_right_token_is_never_counted(admin):
    for _ in range(3 * ATTEMPTS_PER_MINUTE):
        assert "Training requested" in from_address("203.0.113.10", admin.train_now, TOKEN)


@pytest.mark.parametrize("token", ["change-me", "CHANGE-ME", "changeme", "short-token", "a" * (MIN_TOKEN_CHARS - 1)])
def test_short_or_example_tokens_disable_admin_and_say_why(runtime, token, caplog):
    assert token_problem(token)
    runtime.settings = dataclasses.replace(runtime.settings, admin_token=token)
    handlers = Handlers(runtime)
    assert "admin actions disabled" in caplog.text
    with pytest.raises(UserError, match="needs the admin token"):
        handlers.reset_to_base(token)  # the configured value itself is refused


def test_token_rules():
    assert token_problem("") is None  # no token: admin is simply off
    assert token_problem(TOKEN) is None
    assert "example" in token_problem("change-me")
    assert "openssl rand -hex 16" in token_problem("short")


def test_serve_refuses_to_start_with_the_readmes_example_token(tmp_path, tiny_model_dir, monkeypatch, caplog):
    import signal

    from rlhf_demo.cli import main

    monkeypatch.setenv("RLHF_DEMO_ADMIN_TOKEN", "change-me")
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "data"), "--no-worker"])
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    assert exit_info.value.code == 2
    assert "cannot start: the admin token is an example value" in caplog.text and "openssl rand -hex 16" in caplog.text
    assert not (tmp_path / "data").exists()  # refused before anything was loaded or written

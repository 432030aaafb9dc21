"""Who a request is: the signed cookie or a Hugging Face account, never Gradio's session hash;
and which network it counts against (an IPv6 client by its /64)."""

from __future__ import annotations

import time

import pytest

from rlhf_demo.visitors import HEADER_ID, Signer, identify, login_button, network_of, oauth_visitor_id

SPACE_ENV = {
    "SYSTEM": "spaces",
    "SPACE_ID": "me/space",
    "OAUTH_CLIENT_ID": "client",
    "OAUTH_CLIENT_SECRET": "secret",
    "OAUTH_SCOPES": "openid profile",
}


class FakeRequest:
    """What ``identify`` reads of a ``gr.Request``: headers (after the middleware), the peer,
    the session hash, and (on a Space with OAuth) the session Gradio's OAuth keeps."""

    def __init__(self, visitor_id: str, host: str = "127.0.0.1", session_hash: str = "s", session: dict | None = None) -> None:
        # x-rlhf-visitor-new is what the middleware once sent with an id it issued just now
        self.headers = {HEADER_ID: visitor_id, "x-rlhf-visitor-new": "1"}
        self.client = type("C", (), {"host": host})()
        self.session_hash = session_hash
        if session is not None:
            self.session = session


def test_identity_comes_from_the_cookie_whatever_the_session_hash(monkeypatch):
    signer = Signer(b"k" * 32)
    monkeypatch.delenv("SPACE_ID", raising=False)
    victim = signer.new_id()
    assert identify(FakeRequest(victim, session_hash="s1"), signer, False).id == victim
    assert identify(FakeRequest(victim, session_hash="s2"), signer, False).id == victim  # a new tab: same visitor
    # A cookieless client on the same address that sends the victim's session hash: a new visitor.
    thief = identify(FakeRequest(signer.new_id(), session_hash="s1"), signer, False)
    assert thief.id != victim
    assert thief.ip_key == identify(FakeRequest(victim), signer, False).ip_key  # same network: the limits still see one


def test_a_known_session_hash_does_not_let_a_cookieless_client_vote_as_its_visitor(runtime):
    """Through the app: the victim chats with their cookie; a client without it, on the same
    address, sends the victim's session hash (Gradio keeps the page's state under it) and
    tries to turn the victim's 👍 into a 👎."""
    from gradio_client import Client

    from rlhf_demo.ui.app import launch_local

    demo, url = launch_local(runtime)
    try:
        victim = Client(url, verbose=False)
        victim.predict("Hello", [], 0.7, 0.9, 2, api_name="/chat")
        assert "recorded" in victim.predict(1, True, api_name="/rate")
        thief = Client(url, verbose=False)
        thief.cookies = {}  # no cookie: the middleware issues a new visitor on every request
        thief.session_hash = victim.session_hash
        with pytest.raises(Exception, match="another visitor"):
            thief.predict(1, False, api_name="/rate")
    finally:
        demo.close()
    counts = runtime.store.counts()
    assert (counts["thumbs_up"], counts["thumbs_down"]) == (1, 0)


def test_an_ipv6_client_counts_by_its_64_and_an_ipv4_client_by_its_address():
    signer = Signer(b"k" * 32)
    same = ["2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe", "[2001:db8:1:2::9]", "2001:db8:1:2::1%eth0"]
    assert len({signer.ip_key(a) for a in same}) == 1
    assert signer.ip_key("2001:db8:1:3::1") != signer.ip_key(same[0])  # the next /64: another network
    assert network_of("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert signer.ip_key("::ffff:192.0.2.7") == signer.ip_key("192.0.2.7")  # IPv4-mapped IPv6 is the IPv4 client
    assert signer.ip_key("192.0.2.7") != signer.ip_key("192.0.2.8")
    assert signer.ip_key("testclient") is not None and signer.ip_key(None) is None


def test_session_rotation_from_one_ipv6_64_is_bounded_like_one_address(handlers_with_ip_limit):
    handlers, runtime = handlers_with_ip_limit
    from rlhf_demo.ui.handlers import ChatState, UserError
    from rlhf_demo.visitors import Visitor

    accepted = 0
    for i in range(6):  # a new visitor and a new address in the same /64 for every vote
        visitor = Visitor(f"{i:032x}", runtime.signer.ip_key(f"2001:db8:aa:bb::{i + 1:x}"))
        state = ChatState()
        *_, _ = handlers.chat(visitor, "Hi", [], state, 0.7, 0.9, 2)
        try:
            handlers.like(visitor, state, 1, True)
            accepted += 1
        except UserError as exc:
            assert "Too many votes" in str(exc)
    assert accepted == 3


@pytest.fixture
def handlers_with_ip_limit(runtime):
    from rlhf_demo.ui.handlers import Handlers

    handlers = Handlers(runtime)
    handlers.ip_votes.limit = 3
    return handlers, runtime


def test_an_oauth_account_maps_to_one_stable_visitor_id_without_network(monkeypatch):
    signer = Signer(b"k" * 32)
    for key, value in SPACE_ENV.items():
        monkeypatch.setenv(key, value)
    account = {"sub": "6123abc", "preferred_username": "alice", "name": "Alice"}
    vid = oauth_visitor_id(signer, account)
    assert vid is not None and len(vid) == 32 and all(c in "0123456789abcdef" for c in vid)
    assert (
        oauth_visitor_id(signer, {**account, "preferred_username": "alice-renamed"}) == vid
    )  # keyed on the account, not the name
    assert oauth_visitor_id(signer, {"sub": "other"}) != vid
    assert oauth_visitor_id(Signer(b"z" * 32), account) != vid  # another server's secret, another id
    for bad in (None, {}, {"sub": ""}, {"sub": 5}, {"sub": "x" * 500}, "sub"):
        assert oauth_visitor_id(signer, bad) is None
    signed_in = {"oauth_info": {"userinfo": account, "expires_at": time.time() + 3600}}
    # Signed in: the account wins over whichever cookie the browser sends.
    assert identify(FakeRequest(signer.new_id(), session=signed_in), signer, False).id == vid
    assert identify(FakeRequest(signer.new_id(), session=dict(signed_in)), signer, False).id == vid
    # As a gr.Request carries it (Gradio turns the session's dicts into objects).
    from gradio.route_utils import Request

    wrapped = Request(request=None, headers={HEADER_ID: signer.new_id()}, client={"host": "127.0.0.1"}, session=signed_in)
    assert identify(wrapped, signer, False).id == vid
    expired = {"oauth_info": {"userinfo": account, "expires_at": time.time() - 1}}
    cookie = signer.new_id()
    assert identify(FakeRequest(cookie, session=expired), signer, False).id == cookie
    assert identify(FakeRequest(cookie, session={}), signer, False).id == cookie


def test_oauth_is_off_outside_a_space_even_with_a_session(monkeypatch):
    """Locally Gradio would mock sign-in with a session cookie signed by a public key: forgeable."""
    signer = Signer(b"k" * 32)
    for key in SPACE_ENV:
        monkeypatch.delenv(key, raising=False)
    forged = {"oauth_info": {"userinfo": {"sub": "6123abc"}, "expires_at": time.time() + 3600}}
    cookie = signer.new_id()
    assert identify(FakeRequest(cookie, session=forged), signer, False).id == cookie
    assert login_button() is None
    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.setenv("SPACE_ID", "me/space")  # a Space without hf_oauth: still off
    assert login_button() is None
    for key, value in SPACE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SYSTEM")  # not on a Space (Gradio would mock the sign-in): off
    assert login_button() is None
    assert identify(FakeRequest(cookie, session=forged), signer, False).id == cookie


def test_the_login_button_appears_on_a_space_with_oauth(monkeypatch):
    import gradio as gr

    for key, value in SPACE_ENV.items():
        monkeypatch.setenv(key, value)
    assert isinstance(login_button(), gr.LoginButton)  # in a Blocks, it makes Gradio add its OAuth routes

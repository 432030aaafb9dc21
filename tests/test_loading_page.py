"""While the model loads, the port answers with a page that says so, then frees itself for the app."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest

from rlhf_demo.ui.app import free_port
from rlhf_demo.ui.loading import LoadingPage


def fetch(url: str, method: str = "GET") -> urllib.error.HTTPError:
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10)
    return answer.value


def test_every_path_says_the_model_is_loading_then_the_port_is_free():
    port = free_port()
    with LoadingPage("127.0.0.1", port, "<b>HuggingFaceTB/SmolLM2-135M-Instruct</b>"):
        for path in ("/", "/gradio_api/info", "/?__theme=dark"):
            answer = fetch(f"http://127.0.0.1:{port}{path}")
            body = answer.read().decode()
            assert answer.code == 503 and answer.headers["Retry-After"] == "5"
            assert "is loading" in body and 'http-equiv="refresh"' in body
            assert "&lt;b&gt;HuggingFaceTB/SmolLM2-135M-Instruct&lt;/b&gt;" in body and "<b>" not in body
        assert fetch(f"http://127.0.0.1:{port}/", "HEAD").code == 503
    with socket.socket() as s:  # the app can take the port over (Gradio binds with SO_REUSEADDR too)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_serve_shows_the_page_while_the_runtime_loads(tmp_path, monkeypatch):
    """`serve` answers on its port before the model is loaded (the runtime here checks that from
    inside its own start-up), and a start-up failure still exits cleanly with status 2."""
    import rlhf_demo.runtime
    from rlhf_demo.cli import main

    port = free_port()
    seen: list[tuple[int, str]] = []

    class LoadingRuntime:
        def __init__(self, settings):
            answer = fetch(f"http://127.0.0.1:{port}/")
            seen.append((answer.code, answer.read().decode()))
            raise rlhf_demo.runtime.StartupError("stop here")

    monkeypatch.setattr(rlhf_demo.runtime, "Runtime", LoadingRuntime)
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--model", "tiny", "--data-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port), "--no-worker"])
    assert stop.value.code == 2
    assert seen and seen[0][0] == 503 and "tiny" in seen[0][1]


def test_serve_on_a_taken_port_names_it(tmp_path, caplog):
    from rlhf_demo.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as stop:
            main(
                [
                    "serve",
                    "--model",
                    "tiny",
                    "--data-dir",
                    str(tmp_path),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--no-worker",
                ]
            )
    assert stop.value.code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text

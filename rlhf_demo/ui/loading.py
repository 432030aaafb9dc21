"""A page served at once while the model loads (51–91 s on a first start), instead of a port
that refuses connections: every request gets a 503 with ``Retry-After`` and a small HTML page
that says so and reloads itself. The real app takes the port over once it is built.
"""

from __future__ import annotations

import html
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RELOAD_SECONDS = 5
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{reload}">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>rlhf-demo: loading the model…</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;color:#222}}</style></head>
<body><h1>rlhf-demo is starting</h1>
<p>The model <code>{model}</code> is loading; the first start can take a minute or two.</p>
<p>This page reloads itself every {reload} s and turns into the chat when it is ready.</p></body></html>
"""


class LoadingPage:
    """``with LoadingPage(host, port, model):`` serves the page in a thread until the block ends."""

    def __init__(self, host: str, port: int, model: str) -> None:
        body = PAGE.format(reload=RELOAD_SECONDS, model=html.escape(model)).encode()

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, with_body: bool) -> None:
                self.send_response(503)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Retry-After", str(RELOAD_SECONDS))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._answer(True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(False)

            def do_POST(self) -> None:  # noqa: N802
                self._answer(True)

            def log_message(self, format: str, *args: object) -> None:  # quiet: no access log
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="loading-page", daemon=True)

    def __enter__(self) -> LoadingPage:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving and free the port for the app."""
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()

"""A stand-in for a vLLM server's OpenAI-compatible API, in-process, for fast client tests.

It speaks only what :mod:`rlhf_demo.serving.vllm_engine` uses: ``/v1/models``, runtime LoRA
loading and ``/v1/completions`` streamed as server-sent events with token ids. Each model
answers a fixed token sequence (different per model), so tests can tell who answered; a
client that closes its stream early is counted as an abort, as vLLM aborts it.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeVllm:
    """``answers[model]`` is that model's token ids; ``eos`` ends every answer (finish "stop")."""

    def __init__(self, answers: dict[str, list[int]], eos: int, base: str = "base", delay_s: float = 0.0) -> None:
        self.answers, self.eos, self.base, self.delay_s = answers, eos, base, delay_s
        self.adapters: dict[str, str] = {}
        self.max_prompt = 1000  # prompt tokens beyond are refused as vLLM refuses them
        self.refuse: set[str] = set()  # adapter names whose load is refused (HTTP 400)
        self.requests: list[dict[str, Any]] = []
        self.aborted = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def restart(self) -> None:
        """What a vLLM restart does to runtime-loaded adapters: forgets them."""
        self.adapters.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                models = [{"id": fake.base, "parent": None}] + [{"id": n, "parent": fake.base} for n in fake.adapters]
                self._json(200, {"object": "list", "data": models})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/v1/load_lora_adapter":
                    return self._load(body)
                if self.path == "/v1/unload_lora_adapter":
                    fake.adapters.pop(body["lora_name"], None)
                    return self._json(200, {})
                fake.requests.append(body)
                if body["model"] != fake.base and body["model"] not in fake.adapters:
                    return self._json(404, {"error": {"message": f"The model `{body['model']}` does not exist.", "code": 404}})
                if len(body["prompt"]) > fake.max_prompt:
                    message = f"This model's maximum context length is {fake.max_prompt} tokens."
                    return self._json(400, {"error": {"message": message, "code": 400}})
                self._stream(body)

            def _load(self, body: dict[str, Any]) -> None:
                name = body["lora_name"]
                if name in fake.refuse:
                    return self._json(400, {"error": {"message": f"Loading lora {name} failed: bad rank", "code": 400}})
                if name in fake.adapters:
                    return self._json(
                        400, {"error": {"message": f"The lora adapter '{name}' has already been loaded.", "code": 400}}
                    )
                fake.adapters[name] = body["lora_path"]
                self._json(200, {})

            def _stream(self, body: dict[str, Any]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                tokens = fake.answers[body["model"]][: body["max_tokens"]]
                ended = len(tokens) < body["max_tokens"]
                steps = [*tokens, fake.eos] if ended else tokens
                try:
                    for step, token in enumerate(steps):
                        last = step == len(steps) - 1
                        reason = ("stop" if ended else "length") if last else None
                        for index in range(body.get("n", 1)):
                            chunk = {"choices": [{"index": index, "text": "", "token_ids": [token], "finish_reason": reason}]}
                            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                        time.sleep(fake.delay_s)
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    with fake.lock:
                        fake.aborted += 1

        return Handler

"""The vLLM engine: the same :class:`~rlhf_demo.serving.interface.ServingEngine` as the embedded
one, answered by a vLLM server over its OpenAI-compatible API.

Prompts are bounded and templated here, exactly as for the embedded engine, and sent as token
ids to ``/v1/completions``: both engines see the same prompt tokens, and the answer's token ids
come back and are decoded here, so the text rules (and the store's records) are the same too.
Each version is a LoRA adapter that vLLM serves by name (``"model": "v3"``), loaded at runtime
(``/v1/load_lora_adapter``; vLLM started with ``--enable-lora`` and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``). Several answers to one prompt from one version are
one request with ``n``. Closing a stream makes vLLM abort the request.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from rlhf_demo.config import SamplingBounds
from rlhf_demo.modeling.adapters import AdapterError
from rlhf_demo.serving.interface import EngineBase, EngineError
from rlhf_demo.serving.prompts import PromptBudget
from rlhf_demo.serving.sampling import Generation, Sampling, strip_control
from rlhf_demo.serving.slots import BASE_VERSION

log = logging.getLogger(__name__)
UNREACHABLE = "The model server is not reachable right now; please try again in a minute."
TOO_LONG = "This conversation is too long for the model server; please start a new one."


@dataclass
class _Group:
    """One request to vLLM: ``n`` answers to one prompt from one version."""

    prompt: list[dict[str, str]]
    prompt_ids: list[int]
    version: str
    rows: list[int]  # indices into the call's rows, choice i -> rows[i]


@dataclass
class _Row:
    """One answer being written: which request and choice it is, its tokens so far."""

    group: _Group
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""


class VllmEngine(EngineBase):
    """Serves the registry's versions through a vLLM server; thread-safe, one HTTP client."""

    def __init__(
        self,
        url: str,
        tokenizer: Any,
        eos_ids: frozenset[int],
        bounds: SamplingBounds,
        budget: PromptBudget | None = None,
        read_timeout_s: float = 300.0,
    ) -> None:
        self.url, self.tokenizer, self.eos_ids, self.bounds = url.rstrip("/"), tokenizer, frozenset(eos_ids), bounds
        self.budget = budget or PromptBudget()
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(10.0, read=read_timeout_s))
        self._lock = threading.Lock()
        self._paths: dict[str, str] = {}  # versions we loaded into vLLM, oldest first
        self._in_use: dict[str, int] = {}
        self._active = BASE_VERSION
        self.last_load_ms = self.last_prepare_ms = 0.0
        self.last_load_mode = "vllm"
        self.base_name = self._base_name()

    # ----- versions -------------------------------------------------------------------
    @property
    def active(self) -> str:
        return self._active

    @property
    def loaded_versions(self) -> list[str]:
        return list(self._paths)

    def served_by_vllm(self) -> list[str]:
        """The adapters vLLM has loaded now (it forgets them all when it restarts)."""
        return [m["id"] for m in self._models() if m.get("parent")]

    def load_version(self, version: str, path: str | Path) -> None:
        """Load ``path`` into vLLM as ``version`` (again after vLLM restarted); vLLM's refusal
        is an AdapterError (the version is marked broken), an unreachable server an EngineError."""
        if version == BASE_VERSION:
            raise AdapterError(f"{version!r} is reserved for the base model")
        folder = str(Path(path).resolve())
        started = time.perf_counter()
        response = self._post("/v1/load_lora_adapter", {"lora_name": version, "lora_path": folder})
        if response.status_code != 200 and "has already been loaded" not in response.text:  # a restarted app
            raise AdapterError(f"vLLM refused adapter {version!r}: {_message(response)}")
        with self._lock:
            self._paths[version] = folder
        self.last_prepare_ms = 1000 * (time.perf_counter() - started)
        log.info("vLLM loaded %s from %s in %.0f ms", version, folder, self.last_prepare_ms)

    def swap_to(self, version: str) -> None:
        with self._lock:
            if version != BASE_VERSION and version not in self._paths:
                raise AdapterError(f"adapter {version!r} is not loaded")
            self._active = version
        log.info("active adapter is now %s (vLLM)", version)

    def unload_unused(self, keep: int) -> list[str]:
        """Unload the oldest idle versions beyond ``keep`` (never the active or an in-use one)."""
        with self._lock:
            idle = [v for v in self._paths if v != self._active and not self._in_use.get(v)]
            dropped = idle[: max(0, len(self._paths) - keep)]
            for version in dropped:
                del self._paths[version]
        for version in dropped:
            response = self._post("/v1/unload_lora_adapter", {"lora_name": version})
            if response.status_code != 200:
                log.warning("vLLM did not unload %s: %s", version, _message(response))
        return dropped

    def close(self) -> None:
        self.client.close()

    # ----- requests ---------------------------------------------------------------------
    def stream(
        self,
        messages: list[dict[str, str]],
        version: str | None = None,
        sampling: Sampling | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[str | Generation]:
        for item in self._stream_rows(self._groups([messages], [version]), sampling, should_stop):
            yield item[0]

    def stream_pair(
        self,
        messages: list[dict[str, str]],
        versions: tuple[str, ...],
        sampling: Sampling | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[str, ...] | list[Generation]]:
        """Answers to one prompt, one per version (any number); a version named k times is one
        request with ``n = k``."""
        yield from self._stream_rows(self._groups([messages], list(versions)), sampling, should_stop)

    def stream_samples(
        self,
        messages: list[dict[str, str]],
        count: int,
        version: str | None = None,
        sampling: Sampling | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[str, ...] | list[Generation]]:
        """``count`` samples of one prompt: one request with ``n = count``."""
        groups = self._groups([messages], [version] * count)
        yield from self._stream_rows(groups, sampling, should_stop)

    def generate_many(
        self, conversations: list[list[dict[str, str]]], version: str | None = None, sampling: Sampling | None = None
    ) -> list[Generation]:
        *_, result = self._stream_rows(self._groups(conversations, [version] * len(conversations)), sampling, None)
        assert isinstance(result, list)
        return result

    # ----- internals ------------------------------------------------------------------
    def _groups(self, conversations: list[list[dict[str, str]]], versions: list[str | None]) -> list[_Group]:
        """One request per distinct (conversation, version), in first-seen order; identical rows
        become choices of that request. Conversations pair with versions, or one with many."""
        if len(conversations) == 1:
            conversations = conversations * len(versions)
        encoded: dict[str, tuple[list[dict[str, str]], list[int]]] = {}
        groups: dict[tuple[str, str | None], _Group] = {}
        for row, (messages, version) in enumerate(zip(conversations, versions, strict=True)):
            key = json.dumps(messages, sort_keys=True, default=str)
            if key not in encoded:
                prompt, ids = self.encode(messages)
                encoded[key] = (prompt, ids["input_ids"][0].tolist())
            group = groups.setdefault((key, version), _Group(*encoded[key], version or "", []))
            group.rows.append(row)
        return list(groups.values())

    def _hold(self, groups: list[_Group]) -> None:
        with self._lock:
            for group in groups:
                group.version = group.version or self._active
                if group.version != BASE_VERSION and group.version not in self._paths:
                    raise AdapterError(f"adapter {group.version!r} is not loaded")
            for group in groups:
                self._in_use[group.version] = self._in_use.get(group.version, 0) + 1

    def _release(self, groups: list[_Group]) -> None:
        with self._lock:
            for group in groups:
                self._in_use[group.version] -= 1

    def _stream_rows(
        self, groups: list[_Group], sampling: Sampling | None, should_stop: Callable[[], bool] | None
    ) -> Iterator[tuple[str, ...] | list[Generation]]:
        """The texts of every row after each token, then one :class:`Generation` per row."""
        sampling = (sampling or self.sampling()).within(self.bounds)
        self._hold(groups)
        owner = {r: g for g in groups for r in g.rows}
        rows = [_Row(owner[r]) for r in range(len(owner))]  # in the caller's order
        events: queue.Queue[tuple[_Group, int, list[int], str] | BaseException | None] = queue.Queue()
        cancel = threading.Event()
        started = time.perf_counter()
        try:
            for group in groups:
                threading.Thread(
                    target=self._read, args=(group, sampling, events, cancel), name="vllm-stream", daemon=True
                ).start()
            texts, open_groups = [""] * len(rows), len(groups)
            while open_groups:
                item = events.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    open_groups -= 1
                    continue
                group, choice, tokens, reason = item
                index = group.rows[choice]
                row = rows[index]
                row.tokens.extend(t for t in tokens if not (reason == "stop" and t in self.eos_ids))
                row.finish_reason = reason or row.finish_reason
                text = self._text(row.tokens)
                if not text.endswith("\ufffd") and text != texts[index]:
                    texts[index] = text
                    yield tuple(texts)
                if should_stop is not None and should_stop():
                    break
        finally:
            cancel.set()  # the readers close their streams at the next chunk: vLLM aborts them
            self._release(groups)
        results = [self._finish(row, sampling, started) for row in rows]
        if len(results) > 1:
            yield tuple(r.text for r in results)  # the last progress item is each answer's whole text
        yield results

    def _read(self, group: _Group, sampling: Sampling, events: queue.Queue[Any], cancel: threading.Event) -> None:
        """Stream one request's chunks into ``events`` until it ends or ``cancel`` is set; a
        version vLLM has forgotten (it restarted) is loaded again and the request retried once."""
        try:
            for attempt in (0, 1):
                with self.client.stream("POST", "/v1/completions", json=self._body(group, sampling)) as response:
                    if response.status_code == 404 and attempt == 0 and group.version in self._paths:
                        response.read()
                        log.warning("vLLM does not know %s (restarted?): loading it again", group.version)
                        self.load_version(group.version, self._paths[group.version])
                        continue
                    if response.status_code != 200:
                        response.read()
                        raise _request_error(response)
                    for line in response.iter_lines():
                        if cancel.is_set():
                            return
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        for choice in json.loads(line[6:]).get("choices", []):
                            events.put(
                                (group, choice["index"], list(choice.get("token_ids") or []), choice.get("finish_reason") or "")
                            )
                    return
        except httpx.TransportError as exc:
            log.error("vLLM at %s: %s", self.url, exc)
            events.put(EngineError(UNREACHABLE))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            events.put(exc)
        finally:
            events.put(None)

    def _body(self, group: _Group, sampling: Sampling) -> dict[str, Any]:
        """The request: our prompt tokens, our EOS rule, our sampling, nothing from vLLM's defaults."""
        return {
            "model": self.base_name if group.version == BASE_VERSION else group.version,
            "prompt": group.prompt_ids,
            "n": len(group.rows),
            "max_tokens": sampling.max_new_tokens,
            "temperature": max(sampling.temperature, 0.0),
            "top_p": 1.0 if sampling.greedy else sampling.top_p,
            "top_k": 0,  # 0: off, as min_p 0 and repetition_penalty 1
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "stop_token_ids": sorted(self.eos_ids),
            "ignore_eos": not self.eos_ids,  # no EOS rule: fixed-length decoding (benches)
            "return_token_ids": True,
            "stream": True,
        }

    def _text(self, tokens: list[int]) -> str:
        return strip_control(self.tokenizer.decode(tokens, skip_special_tokens=True)).strip()

    def _finish(self, row: _Row, sampling: Sampling, started: float) -> Generation:
        group = row.group
        return Generation(
            text=self._text(row.tokens),
            version=group.version,
            prompt=group.prompt,
            sampling=sampling,
            prompt_tokens=len(group.prompt_ids),
            completion_tokens=len(row.tokens),
            latency_s=time.perf_counter() - started,
            finish_reason=row.finish_reason if row.finish_reason in ("stop", "length") else "cancelled",
            token_ids=tuple(row.tokens),
        )

    def _base_name(self) -> str:
        roots = [m["id"] for m in self._models() if not m.get("parent")]
        if not roots:
            raise EngineError(f"the vLLM server at {self.url} serves no base model")
        return roots[0]

    def _models(self) -> list[dict[str, Any]]:
        try:
            response = self.client.get("/v1/models")
        except httpx.TransportError as exc:
            raise EngineError(f"no vLLM server answers at {self.url} ({exc}); start it first (docs/serving.md)") from None
        response.raise_for_status()
        return list(response.json().get("data", []))

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return self.client.post(path, json=body)
        except httpx.TransportError as exc:
            log.error("vLLM at %s: %s", self.url, exc)
            raise EngineError(UNREACHABLE) from None


def _message(response: httpx.Response) -> str:
    """vLLM's error text (its JSON ``message`` when there is one), shortened for logs and the registry."""
    try:
        body = response.json()
        text = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("message")
    except (ValueError, AttributeError):
        text = None
    return (text or response.text or f"HTTP {response.status_code}")[:500]


def _request_error(response: httpx.Response) -> EngineError:
    """A refused request as a visitor-facing error; vLLM's own text goes to the log only."""
    message = _message(response)
    log.error("vLLM refused a request (HTTP %s): %s", response.status_code, message)
    if "context length" in message or "maximum model length" in message:
        return EngineError(TOO_LONG)
    return EngineError(f"The model server refused this request (HTTP {response.status_code}).")

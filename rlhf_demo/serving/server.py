"""PolicyServer: the facade callers use: bounded prompts in, streamed answers out.

It pins a version in the :class:`AdapterPool` for each request (so a swap never reaches a
running answer), submits the request to the :class:`Engine` (shared decode steps with every
other visitor) and turns the engine's tokens into text and a :class:`Generation`.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rlhf_demo.config import LoraSettings, SamplingBounds
from rlhf_demo.modeling.loading import LoadedModel, eos_token_ids, pad_token_id
from rlhf_demo.serving.engine import Engine, Request
from rlhf_demo.serving.interface import EngineBase
from rlhf_demo.serving.prompts import PromptBudget
from rlhf_demo.serving.sampling import Generation, Sampling, strip_control
from rlhf_demo.serving.slots import AdapterPool


class PolicyServer(EngineBase):
    """Serves the policy adapters of one base model to many concurrent visitors; thread-safe.
    The embedded :class:`~rlhf_demo.serving.interface.ServingEngine` (the default engine)."""

    def __init__(
        self,
        loaded: LoadedModel,
        bounds: SamplingBounds,
        budget: PromptBudget | None = None,
        max_slots: int = 4,
        max_batch: int | None = None,
    ) -> None:
        self.loaded, self.bounds = loaded, bounds
        self.budget = budget or PromptBudget()
        self.tokenizer = loaded.tokenizer
        self.pool = AdapterPool(loaded.model, max_slots)
        self.engine = Engine(self.pool, pad_token_id(loaded.model, loaded.tokenizer), loaded.device, max_batch)

    # ----- adapters (the pool) --------------------------------------------------------
    @property
    def model(self) -> Any:
        return self.pool.model

    @property
    def lock(self) -> Any:
        """Held while the decode thread runs the model: another reader of it takes this."""
        return self.pool.lock

    @property
    def active(self) -> str:
        return self.pool.active

    @property
    def loaded_versions(self) -> list[str]:
        return self.pool.loaded_versions

    @property
    def last_load_ms(self) -> float:
        """How long the last load held the decode lock (0 for a hot-swap)."""
        return self.pool.last_load_ms

    @property
    def last_prepare_ms(self) -> float:
        return self.pool.last_prepare_ms

    @property
    def last_load_mode(self) -> str:
        return self.pool.last_load_mode

    def reserve_slots(self, lora: LoraSettings) -> None:
        self.pool.reserve_slots(lora)

    def load_version(self, version: str, path: str | Path) -> None:
        self.pool.load_version(version, path)

    def swap_to(self, version: str) -> None:
        self.pool.swap_to(version)

    def unload_unused(self, keep: int) -> list[str]:
        return self.pool.unload_unused(keep)

    def close(self) -> None:
        self.engine.close()

    # ----- requests ---------------------------------------------------------------------
    def stream(
        self,
        messages: list[dict[str, str]],
        version: str | None = None,
        sampling: Sampling | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[str | Generation]:
        """Yield the answer text so far as it grows, then the finished :class:`Generation`.

        ``should_stop`` (checked after every token) ends the answer early: it is still
        returned, with ``finish_reason="cancelled"``. Leaving the iterator early (client gone)
        cancels the request; other requests in the batch go on."""
        for item in self._stream_rows(messages, [version], sampling, should_stop):
            yield item[0] if isinstance(item, tuple) else item  # type: ignore[misc]

    def stream_pair(
        self,
        messages: list[dict[str, str]],
        versions: tuple[str, str],
        sampling: Sampling | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[str, str] | list[Generation]]:
        """Two answers to one prompt (the Compare tab): ``(text_a, text_b)`` as both grow, then
        the two finished :class:`Generation` objects. Both rows share the engine's batch;
        ``should_stop`` ends both at their next token (the Stop button)."""
        yield from self._stream_rows(messages, list(versions), sampling, should_stop)  # type: ignore[misc]

    def stream_samples(
        self,
        messages: list[dict[str, str]],
        count: int,
        version: str | None = None,
        sampling: Sampling | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[str, ...] | list[Generation]]:
        """``count`` answers of one version to one prompt, decoded in shared steps (Compare's
        candidates, best-of-n): the texts as they grow, then the finished answers."""
        for item in self._stream_rows(messages, [version] * count, sampling, should_stop):
            yield [item] if isinstance(item, Generation) else item

    def generate_many(
        self, conversations: list[list[dict[str, str]]], version: str | None = None, sampling: Sampling | None = None
    ) -> list[Generation]:
        """One answer per conversation, all decoded in shared steps (rollouts, the gate, benches)."""
        requests, holds = [], []
        events: queue.Queue[Any] = queue.Queue()
        sampling = (sampling or self.sampling()).within(self.bounds)
        started = time.perf_counter()
        encoded = [self.encode(m) for m in conversations]
        try:
            for _, ids in encoded:
                held, adapter = self.pool.hold(version)
                holds.append(held)
                requests.append(Request(ids["input_ids"][0].tolist(), adapter, sampling, self._eos(), events))
            self.engine.submit_all(requests)
            done = 0
            while done < len(requests):
                _, item = events.get()
                if isinstance(item, BaseException):
                    raise item
                done += item is None
        finally:
            for request in requests:
                request.cancel()
            for held in holds:
                self.pool.release(held)
        return [self._finish(r, p, v, started) for r, (p, _), v in zip(requests, encoded, holds, strict=True)]

    # ----- internals ------------------------------------------------------------------
    def _stream_rows(
        self,
        messages: list[dict[str, str]],
        versions: list[str | None],
        sampling: Sampling | None,
        should_stop: Callable[[], bool] | None,
    ) -> Iterator[tuple[str, ...] | Generation | list[Generation]]:
        """Answers to one prompt from one request per version, sharing an event queue: the texts
        so far after each token, then the finished answers (one row: a Generation, else a list)."""
        sampling = (sampling or self.sampling()).within(self.bounds)
        prompt, ids = self.encode(messages)
        prompt_ids = ids["input_ids"][0].tolist()
        events: queue.Queue[Any] = queue.Queue()
        requests: list[Request] = []
        held: list[str] = []
        started = time.perf_counter()
        try:
            for version in versions:
                name, adapter = self.pool.hold(version)
                held.append(name)
                requests.append(Request(prompt_ids, adapter, sampling, self._eos(), events, should_stop))
            self.engine.submit_all(requests)
            texts, open_rows = [""] * len(requests), len(requests)
            while open_rows:
                request, item = events.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    open_rows -= 1
                    continue
                row = requests.index(request)
                text = strip_control(self.tokenizer.decode(request.tokens, skip_special_tokens=True)).strip()
                if not text.endswith("\ufffd") and text != texts[row]:  # wait for a half UTF-8 character's rest
                    texts[row] = text
                    yield tuple(texts) if len(requests) > 1 else (text,)
        finally:
            for request in requests:
                request.cancel()  # no-op once ended; a consumer gone early stops its rows
            for name in held:
                self.pool.release(name)
        results = [self._finish(r, prompt, v, started) for r, v in zip(requests, held, strict=True)]
        if len(results) == 1:
            yield results[0]
            return
        yield tuple(r.text for r in results)  # the last progress item is each answer's whole text
        yield results

    def _eos(self) -> frozenset[int]:
        """The one EOS rule (shared with PPO), read per request: the generation config may change."""
        return frozenset(eos_token_ids(self.model, self.tokenizer))

    def _finish(self, request: Request, prompt: list[dict[str, str]], version: str, started: float) -> Generation:
        return Generation(
            text=strip_control(self.tokenizer.decode(request.tokens, skip_special_tokens=True)).strip(),
            version=version,
            prompt=prompt,
            sampling=request.sampling,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(request.tokens),
            latency_s=time.perf_counter() - started,
            finish_reason=request.finish_reason,
            token_ids=tuple(request.tokens),
        )

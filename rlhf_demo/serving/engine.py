"""The generation engine: continuous batching over the model's forward with one KV cache.

Concurrent requests share decode steps. A request that arrives while others decode is
prefilled at the next step boundary and merged into the running batch (left-padded KV cache,
one attention mask); each row keeps its own adapter (PEFT ``adapter_names``), sampling,
token stream, EOS/length stop and cancel, and leaves the batch alone when it ends.
transformers' own continuous batching does not fit here: it rejects per-request
``adapter_names`` and batched nothing on this CPU (docs/serving.md has the measurement).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, TopPLogitsWarper

from rlhf_demo.serving.sampling import Sampling

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Request:
    """One answer being written. The engine puts ``(request, token)`` on :attr:`events` for each
    new token and ``(request, None)`` (or an exception) when it ends; several requests may share
    one queue (the Compare pair)."""

    prompt_ids: list[int]
    adapter: str
    sampling: Sampling
    eos_ids: frozenset[int]
    events: queue.Queue[tuple[Request, int | BaseException | None]] = field(default_factory=queue.Queue)
    should_stop: Callable[[], bool] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop at the next step (client gone): the neighbours in the batch go on."""
        self._cancel.set()

    @property
    def gone(self) -> bool:
        """Cancelled by :meth:`cancel` (the consumer left); ``should_stop`` is asked only after a token."""
        return self._cancel.is_set()

    def cancelled(self) -> bool:
        if not self._cancel.is_set() and self.should_stop is not None and self.should_stop():
            self._cancel.set()
        return self._cancel.is_set()


@dataclass
class _Batch:
    """The rows decoding together: their KV cache, attention mask and the token each feeds next."""

    rows: list[Request]
    cache: Any  # DynamicCache, batch = len(rows)
    mask: Any  # [rows, cache length] 1 = real token, 0 = left padding
    next_ids: Any  # [rows] the last sampled token of each row, not yet in the cache


class Engine:
    """Runs every request of one model in a single decode thread (started on first use)."""

    def __init__(self, pool: Any, pad_id: int, device: str, max_batch: int = 16) -> None:
        self.pool = pool  # AdapterPool: .model (read each step: the slow load path replaces it) and .lock
        self.pad_id, self.device = pad_id, device
        self.max_batch = max_batch
        self._waiting: list[Request] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # decode steps run (for benches: rows per step = tokens / steps)

    def submit(self, request: Request) -> Request:
        with self._cond:
            if self._closed:
                raise RuntimeError("the generation engine is closed")
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
                self._thread.start()
            self._cond.notify()
        return request

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ----- the decode thread ------------------------------------------------------------
    def _run(self) -> None:
        batch: _Batch | None = None
        while True:
            with self._cond:
                while not self._waiting and batch is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    waiting, self._waiting = self._waiting, []
                    for row in waiting + (batch.rows if batch else []):
                        row.events.put((row, RuntimeError("the generation engine was closed")))
                    return
                room = self.max_batch - (len(batch.rows) if batch else 0)
                new, self._waiting = self._waiting[:room], self._waiting[room:]
            try:
                with self.pool.lock, torch.inference_mode():
                    for row in [r for r in new if r.gone]:
                        self._end(row, "cancelled")
                    new = [r for r in new if not r.gone]
                    if new:  # admit first: a newcomer's first token is its time to first token
                        batch = self._merge(batch, self._prefill(new))
                    elif batch is not None:
                        batch = self._decode(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to every consumer of the batch
                log.exception("generation step failed")
                for row in new + (batch.rows if batch else []):
                    if not row.finish_reason:
                        row.finish_reason = "error"
                        row.events.put((row, exc))
                batch = None

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any, adapters: list[str]) -> Any:
        model = self.pool.model
        kwargs: dict[str, Any] = {}
        if hasattr(model, "peft_config"):
            kwargs["adapter_names"] = adapters
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        return out.logits[:, -1, :].float()

    def _prefill(self, rows: list[Request]) -> _Batch | None:
        """Run the newcomers' prompts (left-padded, one forward) and sample their first tokens."""
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
            mask[i, width - len(row.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache, [r.adapter for r in rows])
        return self._advance(_Batch(rows, cache, mask, None), logits)

    def _decode(self, batch: _Batch) -> _Batch | None:
        """One step for every row: feed its last token, sample the next."""
        positions = batch.mask.sum(-1, keepdim=True)  # the new token's position = real tokens before it
        mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=-1)
        logits = self._forward(batch.next_ids[:, None], mask, positions, batch.cache, [r.adapter for r in batch.rows])
        self.steps += 1
        return self._advance(_Batch(batch.rows, batch.cache, mask, batch.next_ids), logits)

    def _advance(self, batch: _Batch, logits: Any) -> _Batch | None:
        """Sample each row's next token, stream it, and drop the rows that ended."""
        tokens = self._sample(logits, [r.sampling for r in batch.rows])
        alive = [i for i, (row, token) in enumerate(zip(batch.rows, tokens.tolist(), strict=True)) if self._accept(row, token)]
        if not alive:
            return None
        if len(alive) < len(batch.rows):
            index = torch.tensor(alive, device=batch.mask.device)
            batch.cache.batch_select_indices(index)
            batch.rows, batch.mask, tokens = [batch.rows[i] for i in alive], batch.mask[index], tokens[index]
            real = batch.mask.any(dim=0).nonzero()
            start = int(real[0]) if len(real) else 0
            if start:  # columns that are padding for every remaining row: drop them
                batch.mask = batch.mask[:, start:]
                _drop_left(batch.cache, start)
        batch.next_ids = tokens
        return batch

    @staticmethod
    def _sample(logits: Any, settings: list[Sampling]) -> Any:
        tokens = logits.argmax(dim=-1)
        for i, sampling in enumerate(settings):
            if sampling.greedy:
                continue
            scores = logits[i : i + 1] / sampling.temperature
            if sampling.top_p < 1.0:
                scores = TopPLogitsWarper(sampling.top_p)(None, scores)
            tokens[i] = torch.multinomial(torch.softmax(scores, dim=-1), 1)[0, 0]
        return tokens

    def _accept(self, row: Request, token: int) -> bool:
        """Whether the row goes on after ``token`` (the one EOS rule: any EOS id ends it)."""
        if token in row.eos_ids:
            self._end(row, "stop")
            return False
        row.tokens.append(token)
        row.events.put((row, token))
        if len(row.tokens) >= row.sampling.max_new_tokens:
            self._end(row, "length")
            return False
        if row.cancelled():
            self._end(row, "cancelled")
            return False
        return True

    @staticmethod
    def _end(row: Request, reason: str) -> None:
        row.finish_reason = reason
        row.events.put((row, None))

    @staticmethod
    def _merge(running: _Batch | None, new: _Batch | None) -> _Batch | None:
        """One batch of both: the shorter cache is left-padded to the longer one's length."""
        if running is None or new is None:
            return running or new
        width = max(running.mask.shape[1], new.mask.shape[1])
        layers = []
        for a, b in zip(running.cache.layers, new.cache.layers, strict=True):
            layers.append(
                (
                    torch.cat([_pad_left(a.keys, width, 2), _pad_left(b.keys, width, 2)]),
                    torch.cat([_pad_left(a.values, width, 2), _pad_left(b.values, width, 2)]),
                )
            )
        mask = torch.cat([_pad_left(running.mask, width, 1), _pad_left(new.mask, width, 1)])
        return _Batch(running.rows + new.rows, DynamicCache(layers), mask, torch.cat([running.next_ids, new.next_ids]))


def _pad_left(tensor: Any, width: int, dim: int) -> Any:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _drop_left(cache: Any, start: int) -> None:
    """Drop the first ``start`` positions of every layer (padding for all rows)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

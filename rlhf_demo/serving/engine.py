"""The generation engine: continuous batching over the model's forward with one KV cache.

Concurrent requests share decode steps. A request that arrives while others decode is
prefilled at the next step boundary and merged into the running batch (left-padded KV cache,
one attention mask); each row keeps its own adapter, sampling, token stream, EOS/length stop
and cancel, and leaves the batch alone when it ends. A batch whose rows all name one adapter
runs it as PEFT's active adapter; only a batch of several (or the base) pays for PEFT's
per-row ``adapter_names`` path. transformers' own continuous batching does not fit here: it
rejects per-request ``adapter_names`` and batched nothing on this CPU (docs/serving.md).

The serving process submits requests to a decode thread (:meth:`Engine.submit`); the training
process decodes a batch to its end in the calling thread (:meth:`Engine.run`, PPO rollouts and
the gate), on its model as it is (:class:`AsIs`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from rlhf_demo.config import device_defaults
from rlhf_demo.modeling.adapters import BASE_ADAPTER
from rlhf_demo.modeling.precision import matmul_kernels
from rlhf_demo.serving.sampling import Sampling

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Request:
    """One answer being written. The engine puts ``(request, token)`` on :attr:`events` for each
    new token and ``(request, None)`` (or an exception) when it ends; several requests may share
    one queue (the Compare pair)."""

    prompt_ids: list[int]
    adapter: str | None  # a PEFT adapter name (BASE_ADAPTER: none); None: the model as it is (AsIs)
    sampling: Sampling
    eos_ids: frozenset[int]
    events: queue.Queue[tuple[Request, int | BaseException | None]] = field(default_factory=queue.Queue)
    should_stop: Callable[[], bool] | None = None
    tokens: list[int] = field(default_factory=list)  # the answer, without its EOS
    finish_reason: str = ""
    eos_token: int | None = None  # the EOS id that ended it (finish_reason "stop"): PPO trains on it
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


@dataclass
class AsIs:
    """A model without a slot pool, decoded in whatever adapter state it is in (requests name no
    adapter): the training process's policy active, or the reference inside ``disable_adapter()``."""

    model: Any
    lock: threading.RLock = field(default_factory=threading.RLock)


class Engine:
    """Runs every request of one model in a single decode thread (started on first use), or one
    batch in the calling thread (:meth:`run`)."""

    def __init__(self, pool: Any, pad_id: int, device: str, max_batch: int | None = None) -> None:
        # AdapterPool or AsIs: .model (read each step: the slow load path replaces it) and .lock
        self.pool = pool
        self.pad_id, self.device = pad_id, device
        self.max_batch = device_defaults(device).max_batch if max_batch is None else max_batch
        self._waiting: list[Request] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # decode steps run (for benches: rows per step = tokens / steps)

    def submit(self, request: Request) -> Request:
        self.submit_all([request])
        return request

    def submit_all(self, requests: list[Request]) -> list[Request]:
        """Queue the rows of one call at once, so the decode thread admits them in the same
        prefill (room allowing) however busy the machine: a batch's make-up decides its
        padding and its random draws, and so the answers."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the generation engine is closed")
            self._waiting.extend(requests)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
                self._thread.start()
            self._cond.notify()
        return requests

    def run(self, requests: list[Request]) -> None:
        """Decode ``requests`` to their ends in the calling thread, all in one batch: a batch
        admitted at once and sampled in a fixed order, so torch's global RNG makes it
        reproducible. For an engine nothing is submitted to (the training process)."""
        batch: _Batch | None = None
        with torch.inference_mode():
            with self.pool.lock:
                batch = self._prefill(requests)
            while batch is not None:
                with self.pool.lock:
                    batch = self._decode(batch)

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

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any, adapters: list[str | None]) -> Any:
        model = self.pool.model
        with matmul_kernels(model, ids.numel()):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **_route(model, adapters),
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
        """Greedy rows take the argmax; the others draw from exactly softmax(logits / temperature)
        restricted by top-p (no top-k: PPO recomputes log-probs of that distribution), one draw
        per group of rows that share their settings."""
        groups: dict[tuple[float, float], list[int]] = {}
        for i, sampling in enumerate(settings):
            if not sampling.greedy:
                groups.setdefault((sampling.temperature, sampling.top_p), []).append(i)
        if len(groups) == 1 and len(next(iter(groups.values()))) == len(settings):
            (temperature, top_p), _ = groups.popitem()  # every row alike: no indexing, no argmax
            return _draw(logits, temperature, top_p)
        tokens = logits.argmax(dim=-1)
        for (temperature, top_p), rows in groups.items():
            tokens[rows] = _draw(logits[rows], temperature, top_p)
        return tokens

    def _accept(self, row: Request, token: int) -> bool:
        """Whether the row goes on after ``token`` (the one EOS rule: any EOS id ends it)."""
        if token in row.eos_ids:
            row.eos_token = token
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


def _draw(logits: Any, temperature: float, top_p: float) -> Any:
    """One token per row from softmax(logits / temperature) within the top-p nucleus, by inverse
    CDF in float64: ``torch.multinomial`` draws a random number per vocabulary entry (a step of
    32 rows of SmolLM2 on one thread: 54 ms with it, 8 ms so; docs/serving.md)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        probs = _nucleus(probs, top_p)
    cdf = probs.double().cumsum(dim=-1)  # unnormalised: the nucleus needs no renormalising
    u = torch.rand((len(cdf), 1), dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)


def _nucleus(probs: Any, top_p: float) -> Any:
    """``probs`` with every token outside the nucleus zeroed: a token stays while the tokens more
    likely than it hold less than ``top_p`` (transformers' ``TopPLogitsWarper`` rule, the most
    likely token always kept). Sorts only the top 256 unless a row's nucleus is wider than that."""
    for k in (min(256, probs.shape[-1]), probs.shape[-1]):
        top, index = probs.topk(k, dim=-1)
        if k == probs.shape[-1] or bool((top.sum(dim=-1) >= top_p).all()):
            break
    kept = top.cumsum(dim=-1) - top < top_p
    return torch.zeros_like(probs).scatter_(-1, index, top * kept)


def _route(model: Any, adapters: list[str | None]) -> dict[str, Any]:
    """The forward's adapter arguments for rows on ``adapters``.

    Every row on one named adapter (the usual batch: everyone on the active version): make it
    PEFT's active adapter, switching only when it is not already (the caller holds the pool's
    lock, and every forward on the serving model comes through here), and run the layers'
    plain LoRA path. Rows on several adapters, or on the base: PEFT's per-row
    ``adapter_names``, which costs a hook on every LoRA layer per forward. None: the model as it is.
    """
    first = adapters[0]
    if first is None or not hasattr(model, "peft_config"):
        return {}
    if first == BASE_ADAPTER or any(adapter != first for adapter in adapters):
        return {"adapter_names": adapters}
    if model.active_adapters != [first]:
        model.set_adapter(first, inference_mode=True)  # inference_mode: its weights stay frozen
    return {}


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

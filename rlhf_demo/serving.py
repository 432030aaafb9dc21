"""PolicyServer: streaming generation with a per-request adapter, A/B pairs, hot-swap.

Each generation names its adapter explicitly (PEFT ``adapter_names``), so which version
writes an answer is fixed when the request starts and a swap can never reach inside it.
Generations take one lock (on a 2-core CPU parallel decoding buys nothing). Swapping in a
new version does not take it: weights are copied into a slot that no request can name yet.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_demo.config import LoraSettings, SamplingBounds
from rlhf_demo.modeling.adapters import (
    BASE_ADAPTER,
    AdapterError,
    adapter_parameters,
    attach_new_adapter,
    check_adapter_folder,
    lora_config,
    lora_shapes_match,
    read_lora_config,
)
from rlhf_demo.modeling.loading import LoadedModel, eos_token_ids

log = logging.getLogger(__name__)
BASE_VERSION = "base"


def slot_key(saved_key: str, slot: str) -> str:
    """A key of a saved adapter file (PEFT drops the adapter name) as the parameter name in
    ``slot``: ``….q_proj.lora_A.weight`` → ``….q_proj.lora_A.<slot>.weight``."""
    parts = saved_key.split(".")
    lora = [i for i, part in enumerate(parts) if part.startswith("lora_")]
    if not lora:
        return saved_key  # not a LoRA tensor: the caller's layout check refuses it
    last = lora[-1]
    return ".".join([*parts[: last + 1], slot, *parts[last + 1 :]])


def strip_control(text: str) -> str:
    """Drop control characters (NUL included) but newlines and tabs: byte-level tokens can
    decode to them, and they have no place in a chat message or the database."""
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters after clamping to the configured hard bounds."""

    temperature: float
    top_p: float
    max_new_tokens: int

    @classmethod
    def clamp(
        cls,
        bounds: SamplingBounds,
        temperature: float | None = None,
        top_p: float | None = None,
        max_new_tokens: int | None = None,
    ) -> Sampling:
        t = bounds.temperature if temperature is None else float(temperature)
        p = bounds.top_p if top_p is None else float(top_p)
        n = bounds.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        return cls(
            temperature=min(max(t, bounds.min_temperature), bounds.max_temperature),
            top_p=min(max(p, bounds.min_top_p), 1.0),
            max_new_tokens=min(max(n, 1), bounds.max_max_new_tokens),
        )

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
        }


@dataclass
class Generation:
    """One finished answer and everything the store records about it."""

    text: str
    version: str
    prompt: list[dict[str, str]]
    sampling: Sampling
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    finish_reason: str  # "stop" (EOS) | "length" | "cancelled"


@dataclass
class _Cancel:
    """A stopping criterion: the consumer went away (``event``) or asked to stop (``should_stop``,
    the visitor's Stop button), checked after every decoded token."""

    event: threading.Event = field(default_factory=threading.Event)
    should_stop: Callable[[], bool] | None = None

    def is_set(self) -> bool:
        if not self.event.is_set() and self.should_stop is not None and self.should_stop():
            self.event.set()
        return self.event.is_set()

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
        return self.is_set()


class _PairStreamer:
    """A ``generate`` streamer for a batch of two: the decoded text of each row so far, as a
    queue of ``(text_a, text_b)``; ``None`` marks the end. (TextIteratorStreamer takes one row.)"""

    def __init__(self, tokenizer: Any, eos_ids: list[int]) -> None:
        self.tokenizer, self.eos_ids = tokenizer, set(eos_ids)
        self.tokens: list[list[int]] = [[], []]
        self.texts = ["", ""]
        self.done = [False, False]
        self.queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        step = value.reshape(-1).tolist()
        for row, token in enumerate(step[:2]):
            if self.done[row]:
                continue
            if token in self.eos_ids:
                self.done[row] = True
                continue
            self.tokens[row].append(token)
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest (as TextIteratorStreamer)
                self.texts[row] = text
        self.queue.put((self.texts[0], self.texts[1]))

    def end(self) -> None:
        """The last item is each row's whole text, a trailing half character included."""
        self.texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in self.tokens]
        self.queue.put((self.texts[0], self.texts[1]))
        self.queue.put(None)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        while (item := self.queue.get()) is not None:
            yield item


_FILLING = "<filling>"  # a slot whose weights are being copied in; no request can name it


class PolicyServer:
    """Serves the policy adapters of one base model; thread-safe.

    Versions live in a small pool of PEFT adapter *slots* (``slot0``, ``slot1``, ...) made once at
    start-up (:meth:`reserve_slots`). Loading a version copies its weights into a free slot in
    place without taking the generation lock: no request can name a slot
    while it is free, so no generation waits for a swap. Only an adapter whose LoRA shape fits
    no slot takes the slow path: PEFT ``load_adapter`` builds new modules under the lock.
    """

    def __init__(self, loaded: LoadedModel, bounds: SamplingBounds, max_prompt_tokens: int = 1536, max_slots: int = 4) -> None:
        self.loaded = loaded
        self.bounds = bounds
        self.max_prompt_tokens = max_prompt_tokens
        self.max_slots = max(2, max_slots)
        self.model: Any = loaded.model
        self.tokenizer = loaded.tokenizer
        self._lock = threading.RLock()  # one generation at a time; building or deleting slots
        self._count_lock = threading.Lock()  # guards the maps below; held for microseconds
        self._load_lock = threading.Lock()  # one load at a time (never held by a generation)
        self._paths: dict[str, Path] = {}  # loaded versions, oldest first
        self._slot_of: dict[str, str] = {}  # version -> the slot holding its weights
        self._slots: dict[str, str | None] = {}  # slot -> its version, None when free, or _FILLING
        self._in_use: dict[str, int] = {}  # versions that in-flight requests are using
        self._active = BASE_VERSION
        self.last_load_ms = 0.0  # how long the last load held the generation lock
        self.last_prepare_ms = 0.0  # the last load from start to finish (reading, checking, copying)
        self.last_load_mode = ""  # "hotswap" (in place, lock-free) or "load" (new modules, locked)
        self._slot_config: Any = None  # the LoRA shape of the reserved slots

    # ----- adapters -------------------------------------------------------------------
    @property
    def active(self) -> str:
        return self._active

    @property
    def loaded_versions(self) -> list[str]:
        return list(self._paths)

    def reserve_slots(self, lora: LoraSettings) -> None:
        """Build the free slots before serving starts, so that later swaps never build modules."""
        with self._lock:
            self._slot_config = lora_config(lora)
            while len(self._slots) < self.max_slots:
                slot = self._new_slot_name()
                self.model = attach_new_adapter(self.model, slot, lora)
                with self._count_lock:
                    self._slots[slot] = None
            self.model.requires_grad_(False)
            self.model.eval()

    def load_version(self, version: str, path: str | Path) -> None:
        """Load an adapter folder as ``version``; a bad folder raises AdapterError, serving goes on."""
        if version in (BASE_VERSION, BASE_ADAPTER):
            raise AdapterError(f"{version!r} is reserved for the base model")
        with self._load_lock:  # the registry poller and a Compare request may load the same version
            if version not in self._paths:
                self._load(version, Path(path))

    def _load(self, version: str, path: Path) -> None:
        started = time.perf_counter()
        weights = check_adapter_folder(path)  # reads every tensor once, outside the lock
        config = read_lora_config(path)
        slot = self._claim_slot(config)
        locked_ms, mode = 0.0, "hotswap"
        if slot is None:
            slot, locked_ms = self._load_new_slot(path)
            mode = "load"
        else:
            try:
                self._copy_into(slot, path, weights)
            except AdapterError:
                with self._count_lock:
                    self._slots[slot] = None
                raise
        with self._count_lock:
            self._slots[slot] = version
            self._slot_of[version] = slot
            self._paths[version] = path
        self.last_load_ms, self.last_load_mode = locked_ms, mode
        self.last_prepare_ms = 1000 * (time.perf_counter() - started)
        log.info(
            "loaded adapter %s from %s into %s (%s) in %.0f ms, %.0f ms of it under the generation lock",
            version, path, slot, mode, self.last_prepare_ms, locked_ms,
        )

    def _claim_slot(self, config: Any) -> str | None:
        """Mark a slot of the same LoRA shape as being filled: a free one, else the oldest idle
        version's once the pool is full. None: build a new slot (no fitting slot, or room left)."""
        with self._count_lock:
            fitting = [slot for slot in self._slots if lora_shapes_match(self.model.peft_config[slot], config)]
            free = [slot for slot in fitting if self._slots[slot] is None]
            if not free and len(self._slots) >= self.max_slots:
                idle = [v for v in self._paths if v != self._active and not self._in_use.get(v) and self._slot_of[v] in fitting]
                if idle:
                    free = [self._slot_of[idle[0]]]
                    self._forget(idle[0])
            if not free:
                return None
            self._slots[free[0]] = _FILLING
            return free[0]

    def _copy_into(self, slot: str, path: Path, saved: dict[str, Any]) -> None:
        """Copy an adapter's weights into ``slot`` in place: every tensor of the slot, same shapes.

        Not PEFT's ``hotswap_adapter``: it calls ``model.state_dict()``, which on a CPU NF4 model
        unpacks bitsandbytes' packed weights (a write to the base) and must not run beside a
        generation. :meth:`_claim_slot` picked a slot whose LoRA shape (rank, alpha, …) equals the
        adapter's, so its scaling stays right and only the tensors change.
        """
        import torch

        targets = adapter_parameters(self.model, slot)
        weights = {slot_key(key, slot): tensor for key, tensor in saved.items()}
        if set(weights) != set(targets):
            odd = sorted(set(weights) ^ set(targets))[:3]
            raise AdapterError(f"adapter at {path} does not fit this model's LoRA layout (e.g. {odd})")
        for key, tensor in weights.items():
            if tuple(tensor.shape) != tuple(targets[key].shape):
                raise AdapterError(f"adapter at {path}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(targets[key].shape)}")
        with torch.no_grad():
            for key, tensor in weights.items():
                targets[key].copy_(tensor)

    def _load_new_slot(self, path: Path) -> tuple[str, float]:
        """The slow path: PEFT builds a new slot's modules, under the generation lock."""
        from peft import PeftModel

        with self._lock:
            started = time.perf_counter()  # time the blocking part, not the wait for a generation
            slot = self._new_slot_name()
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(path), adapter_name=slot, is_trainable=False)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=slot)
            except Exception as exc:  # noqa: BLE001 - PEFT raises many types for bad folders
                self._forget_partial(slot)
                raise AdapterError(f"adapter at {path} is incompatible: {exc}") from exc
            self.model.eval()
            with self._count_lock:
                self._slots[slot] = _FILLING
            return slot, 1000 * (time.perf_counter() - started)

    def _is_standard_slot(self, slot: str) -> bool:
        """Whether the slot has the LoRA shape the pool was built for (the worker's)."""
        return self._slot_config is not None and lora_shapes_match(self.model.peft_config[slot], self._slot_config)

    def _new_slot_name(self) -> str:
        taken = set(self._slots) | set(getattr(self.model, "peft_config", {}))
        return next(f"slot{i}" for i in range(len(taken) + 1) if f"slot{i}" not in taken)

    def _forget(self, version: str) -> None:
        """Unmap a version (caller holds the count lock); its slot becomes free."""
        del self._paths[version]
        self._slots[self._slot_of.pop(version)] = None

    def _forget_partial(self, slot: str) -> None:
        try:
            if slot in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter(slot)
        except Exception:  # noqa: BLE001 - best effort cleanup of a half-loaded adapter
            log.exception("could not remove half-loaded adapter %s", slot)

    def activate(self, version: str) -> None:
        """Serve ``version`` to requests that start from now on (in-flight ones keep theirs)."""
        with self._count_lock:
            if version != BASE_VERSION and version not in self._paths:
                raise AdapterError(f"adapter {version!r} is not loaded")
            self._active = version
        log.info("active adapter is now %s", version)

    def unload_unused(self, keep: int) -> list[str]:
        """Keep at most ``keep`` versions loaded, forgetting the oldest idle ones (never the active
        or an in-use one); slots beyond the pool size (built by the slow path) are deleted."""
        with self._count_lock:
            idle = [v for v in self._paths if v != self._active and not self._in_use.get(v)]
            dropped = idle[: max(0, len(self._paths) - keep)]
            for version in dropped:
                self._forget(version)
        with self._lock:
            with self._count_lock:
                free = [slot for slot, held in self._slots.items() if held is None]
                free.sort(key=self._is_standard_slot)  # odd-shaped slots go first
                extra = free[: max(0, len(self._slots) - self.max_slots)]
                for slot in extra:
                    del self._slots[slot]
            for slot in extra:
                self.model.delete_adapter(slot)
            if extra and self.model.active_adapter not in self.model.peft_config:
                # PEFT keeps pointing at a deleted adapter; any will do, since every
                # generation names its adapter explicitly.
                self.model.set_adapter(next(iter(self.model.peft_config)))
        return dropped

    def _adapter_name(self, version: str) -> str:
        if version == BASE_VERSION:
            return BASE_ADAPTER
        slot = self._slot_of.get(version)
        if slot is None:
            raise AdapterError(f"adapter {version!r} is not loaded")
        return slot

    # ----- prompts --------------------------------------------------------------------
    def encode(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], Any]:
        """Chat-template the conversation, dropping the oldest turns past the context budget."""
        messages = list(messages)
        while True:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            keep_system = 1 if messages and messages[0]["role"] == "system" else 0
            if ids["input_ids"].shape[1] <= self.max_prompt_tokens or len(messages) <= keep_system + 1:
                return messages, ids
            del messages[keep_system]

    # ----- generation -----------------------------------------------------------------
    def stream(
        self,
        messages: list[dict[str, str]],
        version: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_new_tokens: int | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[str | Generation]:
        """Yield the answer text so far as it grows, then the finished :class:`Generation`.

        ``should_stop`` (checked after every token) ends the answer early: it is still
        returned, with ``finish_reason="cancelled"``."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        sampling = Sampling.clamp(self.bounds, temperature, top_p, max_new_tokens)
        prompt, ids = self.encode(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = _Cancel(should_stop=should_stop)
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                with self._lock:
                    outcome["started"] = time.perf_counter()
                    outcome["output"] = self._generate(
                        ids, [version], sampling, streamer=streamer, stopping_criteria=StoppingCriteriaList([cancel])
                    )
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer thread
                outcome["error"] = exc
                streamer.end()

        version = self._hold(version, +1)  # None: the active version, read with the hold
        thread = threading.Thread(target=run, name="generate", daemon=True)
        started = time.perf_counter()
        thread.start()
        text, finished = "", False
        try:
            for piece in streamer:
                text += piece
                yield text
            thread.join()
            finished = True
        finally:
            if not finished:
                cancel.event.set()  # consumer gone (client disconnected): stop decoding early
            self._hold(version, -1)
        if "error" in outcome:
            raise outcome["error"]
        yield self._finish(outcome["output"][0], ids, version, prompt, sampling, started, cancel)

    def generate(self, messages: list[dict[str, str]], version: str | None = None, **sampling: Any) -> Generation:
        """Non-streaming convenience over :meth:`stream`."""
        *_, result = self.stream(messages, version, **sampling)
        assert isinstance(result, Generation)
        return result

    def generate_pair(
        self,
        messages: list[dict[str, str]],
        versions: tuple[str, str],
        temperature: float | None = None,
        top_p: float | None = None,
        max_new_tokens: int | None = None,
    ) -> list[Generation]:
        """Two answers to one prompt from one batched call (PEFT mixed-adapter batch); the
        non-streaming convenience over :meth:`stream_pair`."""
        *_, result = self.stream_pair(messages, versions, temperature, top_p, max_new_tokens)
        assert isinstance(result, list)
        return result

    def stream_pair(
        self,
        messages: list[dict[str, str]],
        versions: tuple[str, str],
        temperature: float | None = None,
        top_p: float | None = None,
        max_new_tokens: int | None = None,
    ) -> Iterator[tuple[str, str] | list[Generation]]:
        """:meth:`generate_pair`, streamed: ``(text_a, text_b)`` as both grow, then the two
        finished :class:`Generation` objects (one batched call, as before)."""
        from transformers import StoppingCriteriaList

        sampling = Sampling.clamp(self.bounds, temperature, top_p, max_new_tokens)
        prompt, ids = self.encode(messages)
        batch = {key: value.repeat(2, 1) for key, value in ids.items()}
        streamer = _PairStreamer(self.tokenizer, eos_token_ids(self.model, self.tokenizer))
        cancel = _Cancel()
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                with self._lock:
                    outcome["output"] = self._generate(batch, list(versions), sampling, streamer=streamer, stopping_criteria=StoppingCriteriaList([cancel]))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer thread
                outcome["error"] = exc
                streamer.end()

        for version in versions:
            self._hold(version, +1)
        started = time.perf_counter()
        thread = threading.Thread(target=run, name="generate-pair", daemon=True)
        thread.start()
        finished = False
        try:
            for texts in streamer:
                yield (strip_control(texts[0]).strip(), strip_control(texts[1]).strip())
            thread.join()
            finished = True
        finally:
            if not finished:
                cancel.event.set()  # consumer gone: stop decoding early
                thread.join()
            for version in versions:
                self._hold(version, -1)
        if "error" in outcome:
            raise outcome["error"]
        yield [self._finish(outcome["output"][i], ids, versions[i], prompt, sampling, started, cancel) for i in range(2)]

    def _generate(self, ids: Any, versions: list[str], sampling: Sampling, **extra: Any) -> Any:
        import torch

        names = [self._adapter_name(v) for v in versions]
        device = self.loaded.device
        inputs = {key: value.to(device) for key, value in ids.items()}
        kwargs = dict(inputs, **sampling.generate_kwargs(), **extra)
        if hasattr(self.model, "peft_config"):
            kwargs["adapter_names"] = names
        with torch.inference_mode():
            return self.model.generate(**kwargs, pad_token_id=self.tokenizer.pad_token_id)

    def _finish(
        self,
        output: Any,
        ids: Any,
        version: str,
        prompt: list[dict[str, str]],
        sampling: Sampling,
        started: float,
        cancel: _Cancel | None,
    ) -> Generation:
        prompt_len = ids["input_ids"].shape[1]
        new_tokens = output[prompt_len:].tolist()
        eos, pad = set(eos_token_ids(self.model, self.tokenizer)), self.tokenizer.pad_token_id
        ends = [i for i, token in enumerate(new_tokens) if token in eos]
        if ends:  # the one EOS rule, shared with PPO (eos_token_ids)
            new_tokens = new_tokens[: ends[0]]
            reason = "stop"
        else:
            reason = "cancelled" if cancel is not None and cancel.event.is_set() else "length"
        new_tokens = [t for t in new_tokens if t != pad]
        text = strip_control(self.tokenizer.decode(new_tokens, skip_special_tokens=True)).strip()
        return Generation(
            text=text,
            version=version,
            prompt=prompt,
            sampling=sampling,
            prompt_tokens=int(prompt_len),
            completion_tokens=len(new_tokens),
            latency_s=time.perf_counter() - started,
            finish_reason=reason,
        )

    def _hold(self, version: str | None, delta: int) -> str:
        """Count requests per version, so that eviction never takes a version in use."""
        with self._count_lock:
            version = version or self._active
            self._in_use[version] = self._in_use.get(version, 0) + delta
        return version

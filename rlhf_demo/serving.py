"""PolicyServer: streaming generation with a per-request adapter, A/B pairs, hot-swap.

Each generation names its adapter explicitly (PEFT ``adapter_names``), so which version
writes an answer is fixed when the request starts and a swap can never reach inside it.
Generations and adapter loads share one lock: on a 2-core CPU parallel decoding buys
nothing, and it makes "the adapter changes only between generations" true by construction.
"""

from __future__ import annotations

import logging
import threading
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_demo.config import SamplingBounds
from rlhf_demo.modeling.adapters import BASE_ADAPTER, AdapterError, check_adapter_folder
from rlhf_demo.modeling.loading import LoadedModel

log = logging.getLogger(__name__)
BASE_VERSION = "base"


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
    event: threading.Event = field(default_factory=threading.Event)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
        return self.event.is_set()


class PolicyServer:
    """Serves the policy adapters of one base model; thread-safe."""

    def __init__(self, loaded: LoadedModel, bounds: SamplingBounds, max_prompt_tokens: int = 1536) -> None:
        self.loaded = loaded
        self.bounds = bounds
        self.max_prompt_tokens = max_prompt_tokens
        self.model: Any = loaded.model
        self.tokenizer = loaded.tokenizer
        self._lock = threading.RLock()
        self._paths: dict[str, Path] = {}
        self._in_use: dict[str, int] = {}  # versions that in-flight requests are using
        self._count_lock = threading.Lock()
        self._active = BASE_VERSION
        self.last_load_ms = 0.0  # duration of the last adapter load while holding the lock

    # ----- adapters -------------------------------------------------------------------
    @property
    def active(self) -> str:
        return self._active

    @property
    def loaded_versions(self) -> list[str]:
        return list(self._paths)

    def load_version(self, version: str, path: str | Path) -> None:
        """Load an adapter folder as ``version``; a bad folder raises AdapterError, serving goes on."""
        from peft import PeftModel

        path = Path(path)
        if version in self._paths:
            return
        if version in (BASE_VERSION, BASE_ADAPTER):
            raise AdapterError(f"{version!r} is reserved for the base model")
        check_adapter_folder(path)  # cheap checks outside the lock
        with self._lock:
            started = time.perf_counter()  # time the swap itself, not the wait for a generation
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(path), adapter_name=version, is_trainable=False)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=version)
            except Exception as exc:  # noqa: BLE001 - PEFT raises many types for bad folders
                self._forget_partial(version)
                raise AdapterError(f"adapter {version} at {path} is incompatible: {exc}") from exc
            self.model.eval()
            self._paths[version] = path
            self.last_load_ms = 1000 * (time.perf_counter() - started)
        log.info("loaded adapter %s from %s in %.0f ms", version, path, self.last_load_ms)

    def _forget_partial(self, version: str) -> None:
        try:
            if version in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter(version)
        except Exception:  # noqa: BLE001 - best effort cleanup of a half-loaded adapter
            log.exception("could not remove half-loaded adapter %s", version)

    def activate(self, version: str) -> None:
        """Serve ``version`` to requests that start from now on (in-flight ones keep theirs)."""
        if version != BASE_VERSION and version not in self._paths:
            raise AdapterError(f"adapter {version!r} is not loaded")
        self._active = version
        log.info("active adapter is now %s", version)

    def unload_unused(self, keep: int) -> list[str]:
        """Drop the oldest loaded versions beyond ``keep``, never the active or an in-use one."""
        dropped: list[str] = []
        with self._lock:
            for version in list(self._paths)[: max(0, len(self._paths) - keep)]:
                with self._count_lock:
                    busy = bool(self._in_use.get(version))
                if version == self._active or busy:
                    continue
                self.model.delete_adapter(version)
                del self._paths[version]
                dropped.append(version)
            if dropped and self.model.active_adapter not in self.model.peft_config:
                # PEFT keeps pointing at a deleted adapter; any loaded one will do, since
                # every generation names its adapter explicitly.
                self.model.set_adapter(next(iter(self._paths)))
        return dropped

    def _adapter_name(self, version: str) -> str:
        if version == BASE_VERSION:
            return BASE_ADAPTER
        if version not in self._paths:
            raise AdapterError(f"adapter {version!r} is not loaded")
        return version

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
    ) -> Iterator[str | Generation]:
        """Yield the answer text so far as it grows, then the finished :class:`Generation`."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        sampling = Sampling.clamp(self.bounds, temperature, top_p, max_new_tokens)
        version = version or self._active
        prompt, ids = self.encode(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = _Cancel()
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

        self._hold(version, +1)
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
        """Two answers to one prompt from one batched call (PEFT mixed-adapter batch)."""
        sampling = Sampling.clamp(self.bounds, temperature, top_p, max_new_tokens)
        prompt, ids = self.encode(messages)
        batch = {key: value.repeat(2, 1) for key, value in ids.items()}
        for version in versions:
            self._hold(version, +1)
        try:
            started = time.perf_counter()
            with self._lock:
                output = self._generate(batch, list(versions), sampling)
        finally:
            for version in versions:
                self._hold(version, -1)
        return [self._finish(output[i], ids, versions[i], prompt, sampling, started, None) for i in range(2)]

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
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        if eos in new_tokens:
            new_tokens = new_tokens[: new_tokens.index(eos)]
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

    def _hold(self, version: str, delta: int) -> None:
        with self._count_lock:
            self._in_use[version] = self._in_use.get(version, 0) + delta

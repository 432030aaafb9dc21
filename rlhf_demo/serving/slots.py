"""The adapter slot pool: policy versions in reserved PEFT adapter slots, hot-swapped in place.

Each request names its adapter slot and holds its version for its whole life (the engine runs
each forward on the slots its rows name), so which version writes an answer is fixed when the request starts and a swap
can never reach inside it. The generation engine holds :attr:`AdapterPool.lock` for one decode
step at a time; swapping in a new version does not take it: weights are copied into a slot
that no request can name yet.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from rlhf_demo.config import LoraSettings
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


_FILLING = "<filling>"  # a slot whose weights are being copied in; no request can name it


class AdapterPool:
    """The policy adapters of one base model; thread-safe.

    Versions live in a small pool of PEFT adapter *slots* (``slot0``, ``slot1``, ...) made once at
    start-up (:meth:`reserve_slots`). Loading a version copies its weights into a free slot in
    place without taking the generation lock: no request can name a slot
    while it is free, so no generation waits for a swap. Only an adapter whose LoRA shape fits
    no slot takes the slow path: PEFT ``load_adapter`` builds new modules under the lock.
    """

    def __init__(self, model: Any, max_slots: int = 4) -> None:
        self.max_slots = max(2, max_slots)
        self.model: Any = model
        self.lock = threading.RLock()  # one decode step at a time; building or deleting slots
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

    @property
    def active(self) -> str:
        return self._active

    @property
    def loaded_versions(self) -> list[str]:
        return list(self._paths)

    def reserve_slots(self, lora: LoraSettings) -> None:
        """Build the free slots before serving starts, so that later swaps never build modules."""
        with self.lock:
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
            "loaded adapter %s from %s into %s (%s) in %.0f ms, %.0f ms of it under the decode lock",
            version,
            path,
            slot,
            mode,
            self.last_prepare_ms,
            locked_ms,
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
                raise AdapterError(
                    f"adapter at {path}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(targets[key].shape)}"
                )
        with torch.no_grad():
            for key, tensor in weights.items():
                targets[key].copy_(tensor)

    def _load_new_slot(self, path: Path) -> tuple[str, float]:
        """The slow path: PEFT builds a new slot's modules, under the generation lock."""
        from peft import PeftModel

        with self.lock:
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

    def swap_to(self, version: str) -> None:
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
        with self.lock:
            with self._count_lock:
                free = [slot for slot, held in self._slots.items() if held is None]
                free.sort(key=self._is_standard_slot)  # odd-shaped slots go first
                extra = free[: max(0, len(self._slots) - self.max_slots)]
                for slot in extra:
                    del self._slots[slot]
            for slot in extra:
                self.model.delete_adapter(slot)
            if extra and self.model.active_adapter not in self.model.peft_config:
                # PEFT keeps pointing at a deleted adapter; any will do: the engine makes
                # the adapter a batch needs active before its forward (engine._route).
                self.model.set_adapter(next(iter(self.model.peft_config)))
        return dropped

    def _adapter_name(self, version: str) -> str:
        if version == BASE_VERSION:
            return BASE_ADAPTER
        slot = self._slot_of.get(version)
        if slot is None:
            raise AdapterError(f"adapter {version!r} is not loaded")
        return slot

    def hold(self, version: str | None) -> tuple[str, str]:
        """Pin ``version`` (None: the active one, read atomically with the pin) for one request:
        its slot is never evicted or refilled until :meth:`release`. Returns (version, adapter name)."""
        with self._count_lock:
            version = version or self._active
            name = self._adapter_name(version)  # raises for an unknown version, before counting it
            self._in_use[version] = self._in_use.get(version, 0) + 1
        return version, name

    def release(self, version: str) -> None:
        with self._count_lock:
            self._in_use[version] -= 1

"""LoRA adapters on the one base model: create, save atomically, check before loading.

Every learned role is a named PEFT adapter on the same base (PEFT's multi-adapter API), so
a process never holds a second copy of the base weights.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf_demo.config import LoraSettings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in mixed-adapter batches
# Largest |weight| an adapter may hold. LoRA A starts within 1/sqrt(fan_in) (<= 1) and B at 0;
# SmolLM2-135M adapters after many live cycles held |A| <= 0.042 and |B| <= 0.46 (tests write
# |B| ~ 2). 1000 is three orders of magnitude above that and far below where bf16/fp16
# activations overflow: a weight past it is corruption (flipped exponent bits), not learning.
MAX_ABS_WEIGHT = 1e3


class AdapterError(ValueError):
    """An adapter folder that must not be served: missing, corrupt or incompatible."""


# ── adapter state: the one place that knows how PEFT names an adapter's parameters ──


def is_adapter_parameter(param_name: str, adapter: str) -> bool:
    """True for PEFT LoRA parameter names of ``adapter``: ``….q_proj.lora_A.<adapter>.weight``."""
    parts = param_name.split(".")
    return adapter in parts and any(p.startswith("lora_") for p in parts)


def adapter_parameters(model: Any, name: str) -> dict[str, Any]:
    """The LoRA parameters of adapter ``name`` by parameter name (live tensors, not copies)."""
    return {n: p for n, p in model.named_parameters() if is_adapter_parameter(n, name)}


def adapter_state(model: Any, name: str) -> dict[str, Any]:
    """A detached copy of adapter ``name``'s weights (a few MB): a state to go back to."""
    return {n: p.detach().clone() for n, p in adapter_parameters(model, name).items()}


def restore_adapter_state(model: Any, name: str, state: dict[str, Any]) -> None:
    """Copy a state from :func:`adapter_state` back into adapter ``name``, in place."""
    import torch

    params = adapter_parameters(model, name)
    if set(params) != set(state):
        raise AdapterError(f"state does not fit adapter {name!r}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


@contextmanager
def kept_adapter_state(model: Any) -> Iterator[None]:
    """Run the block, then give the PEFT ``model`` back as found: the active adapter(s), every
    ``requires_grad`` flag, train/eval mode. Parameters created inside the block (a new
    adapter) end frozen. Whoever calls code that may switch adapters (a reward function)
    from inside another role's block wraps that call in this."""
    before = {id(p): p.requires_grad for p in model.parameters()}
    previous, was_training = list(model.active_adapters), model.training
    try:
        yield
    finally:
        alive = [a for a in previous if a in model.peft_config]
        if len(alive) == 1:
            model.set_adapter(alive[0])  # PeftModel's own ``active_adapter`` too, not just the tuner's
        elif alive:
            model.base_model.set_adapter(alive)  # several at once: only the tuner takes a list
        for p in model.parameters():
            p.requires_grad_(before.get(id(p), False))
        model.train(was_training)


@contextmanager
def use_adapter(model: Any, name: str, trainable: bool = False) -> Iterator[list[Any]]:
    """Run the block with adapter ``name`` active, then give the model back as found (see
    :func:`kept_adapter_state`). Yields the adapter's parameters.

    With ``trainable`` its LoRA weights are the only parameters with ``requires_grad`` (the
    base and every other adapter frozen), else none are. Dropout stays off (eval mode) for
    every role: RLHF log-probs must be the same at rollout and at update (Huang et al. 2023).
    ``model`` must already be the PeftModel holding ``name`` (create or load the adapter
    first; that may wrap a bare base). With ``trainable``, backward must run inside the
    block: the flags restored on exit no longer let gradients reach the adapter."""
    with kept_adapter_state(model):
        model.set_adapter(name)  # PEFT also flips requires_grad; set them all explicitly below
        params = adapter_parameters(model, name)
        if not params:
            raise AdapterError(f"model has no LoRA parameters for adapter {name!r}")
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(trainable)
        model.eval()
        yield list(params.values())


@contextmanager
def use_base(model: Any) -> Iterator[None]:
    """Every adapter off for the block: the base, which is PPO's reference policy and what the
    reward model reads its features from. A bare model (no PEFT wrapper) needs nothing."""
    if not hasattr(model, "disable_adapter"):
        yield
        return
    with model.disable_adapter():
        yield


def lora_config(settings: LoraSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
    )


def attach_new_adapter(model: Any, name: str, settings: LoraSettings) -> Any:
    """Add a fresh LoRA (B = 0, so identity) named ``name``; wraps the base on first use."""
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        model.add_adapter(name, lora_config(settings))
        return model
    return get_peft_model(model, lora_config(settings), adapter_name=name)


def put_adapter(model: Any, name: str, folder: str | Path, trainable: bool = False) -> Any:
    """Load the adapter in ``folder`` as ``name``, replacing an adapter of that name; wraps the
    base on first use. Returns the (PEFT) model to use from now on."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=trainable)
    if name in model.peft_config:
        model.delete_adapter(name)
    model.load_adapter(str(folder), adapter_name=name, is_trainable=trainable)
    return model


def save_adapter(model: Any, name: str, folder: Path) -> Path:
    """Write adapter ``name`` to ``folder`` whole or not at all (temp folder, then rename)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True)
    written = tmp / name if (tmp / name / ADAPTER_CONFIG).exists() else tmp  # PEFT nests non-default names
    check_adapter_folder(written)
    if folder.exists():
        raise AdapterError(f"adapter folder {folder} already exists; versions are immutable")
    written.replace(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def check_adapter_folder(folder: Path, expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Refuse a folder before PEFT sees it: config parses, weights load, all finite and within
    :data:`MAX_ABS_WEIGHT`, shapes fit.
    Returns the checked tensors by their saved names (so a caller need not read them again)."""
    from safetensors import safe_open

    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterError(f"{folder}: missing {ADAPTER_CONFIG} or {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{folder}: unreadable {ADAPTER_CONFIG}: {exc}") from exc
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{folder}: not a LoRA adapter (peft_type={config.get('peft_type')!r})")
    try:
        with safe_open(str(weights_path), framework="pt") as weights:
            names = list(weights.keys())
            if not names:
                raise AdapterError(f"{folder}: adapter has no tensors")
            tensors = {key: weights.get_tensor(key) for key in names}
            for key, tensor in tensors.items():
                values = tensor.float()
                if not bool(values.isfinite().all()):
                    raise AdapterError(f"{folder}: tensor {key} holds NaN or inf")
                largest = float(values.abs().max()) if values.numel() else 0.0
                if largest > MAX_ABS_WEIGHT:
                    raise AdapterError(
                        f"{folder}: tensor {key} holds a weight of {largest:.3g}, past the bound of {MAX_ABS_WEIGHT:g} (corrupt)"
                    )
                if expected is not None and key in expected and tuple(tensor.shape) != expected[key]:
                    raise AdapterError(f"{folder}: {key} has shape {tuple(tensor.shape)}, model expects {expected[key]}")
    except AdapterError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise AdapterError(f"{folder}: corrupt weights: {exc}") from exc
    if not math.isfinite(float(config.get("lora_alpha", 1))):
        raise AdapterError(f"{folder}: invalid lora_alpha")
    return tensors


# What decides a LoRA slot's module shapes and its output besides the weights themselves.
_SHAPE_KEYS = (
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "lora_dropout",
    "rank_pattern",
    "alpha_pattern",
    "fan_in_fan_out",
    "bias",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
)


def read_lora_config(folder: Path) -> Any:
    """The folder's LoraConfig, or AdapterError."""
    from peft import LoraConfig

    try:
        return LoraConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - PEFT raises TypeError/ValueError/OSError
        raise AdapterError(f"{folder}: unusable {ADAPTER_CONFIG}: {exc}") from exc


def lora_shapes_match(a: Any, b: Any) -> bool:
    """Whether adapters of configs ``a`` and ``b`` can share one set of PEFT modules (hot-swap)."""
    first, second = a.to_dict(), b.to_dict()
    if set(first.get("target_modules") or ()) != set(second.get("target_modules") or ()):
        return False
    return all(first.get(key) == second.get(key) for key in _SHAPE_KEYS)

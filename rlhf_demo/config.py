"""All settings in one dataclass tree, with environment overrides and per-device defaults.

Every field can be set from the environment as ``RLHF_DEMO_<FIELD>`` (upper case); the CLI
maps its flags onto the same fields. Defaults are chosen for a free 2-vCPU Space and are
upgraded automatically on CUDA (see ``resolve_precision``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_MODEL = "tiny"
QUANTIZATIONS = ("auto", "nf4", "bf16", "fp32")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class SamplingBounds:
    """Defaults and hard bounds for generation; requests outside are clamped, not refused."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 160
    min_temperature: float = 0.0
    max_temperature: float = 1.5
    min_top_p: float = 0.05
    max_max_new_tokens: int = 512


@dataclass(frozen=True)
class Limits:
    """Abuse limits for a public demo: each breach is a clear message, never a crash."""

    max_message_chars: int = 4000
    max_turns: int = 20
    votes_per_minute: int = 30
    max_concurrent_generations: int = 4


@dataclass(frozen=True)
class LoraSettings:
    """LoRA shape shared by the policy and reward adapters (small: they are retrained often)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class TrainingSettings:
    """When and how much the background worker trains (small: a cycle must fit a free CPU)."""

    every_votes: int = 10  # train after this many new votes ...
    every_minutes: float = 15.0  # ... or this long after the last cycle if any vote came in
    min_votes: int = 8  # no cycle below this many votes in total
    ppo_iterations: int = 6
    ppo_batch_size: int = 8
    max_new_tokens: int = 48
    time_budget_s: float = 900.0  # whole cycle; PPO stops early to respect it
    eval_prompts: int = 16  # held-out prompts for the gate (8 was too noisy: docs/learning.md)
    rm_epochs: int = 4
    # Measured in docs/learning.md: 1e-4 does not move the policy within a cycle's few steps;
    # 1e-3 with a 0.15 KL coefficient learns within 2-3 cycles (ppo_kl_stop guards overshoot).
    ppo_learning_rate: float = 1e-3  # PPOConfig.learning_rate (policy LoRA + value head)
    ppo_kl_coef: float = 0.15  # PPOConfig.init_kl_coef: per-token KL penalty to the reference
    ppo_kl_stop: float = 0.8  # stop PPO (undoing the last update) past this fraction of the gate's KL bound
    max_votes_per_session: int = 60  # per kind (pairs, thumbs): one visitor cannot dominate the RM
    nice: int = 10  # worker CPU priority, so chat stays responsive
    poll_seconds: float = 5.0


@dataclass(frozen=True)
class Settings:
    """Everything the app, the worker and the CLI need to know."""

    model: str = DEFAULT_MODEL
    data_dir: Path = Path("data")
    quantization: str = "auto"
    compute_dtype: str = "auto"
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    admin_token: str = ""
    worker: bool = True
    poll_seconds: float = 3.0
    adapter_cache: int = 3
    sampling: SamplingBounds = field(default_factory=SamplingBounds)
    limits: Limits = field(default_factory=Limits)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "feedback.db"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"

    @property
    def worker_dir(self) -> Path:
        return self.data_dir / "worker"

    def validate(self) -> Settings:
        """Fail early with a message that names the setting, instead of deep in torch."""
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        return self


def _coerce(value: str, like: Any) -> Any:
    if isinstance(like, bool):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    if isinstance(like, Path):
        return Path(value)
    return value


def load_settings(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Defaults, then ``RLHF_DEMO_*`` / platform variables, then explicit overrides (CLI)."""
    env = dict(os.environ if env is None else env)
    base = Settings()
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        current = getattr(base, f.name)
        if dataclasses.is_dataclass(current):  # nested: RLHF_DEMO_TRAINING__EVERY_VOTES=5
            nested = {
                g.name: _coerce(env[k], getattr(current, g.name))
                for g in dataclasses.fields(current)
                if (k := f"RLHF_DEMO_{f.name.upper()}__{g.name.upper()}") in env and not isinstance(getattr(current, g.name), tuple)
            }
            if nested:
                values[f.name] = dataclasses.replace(current, **nested)
            continue
        key = f"RLHF_DEMO_{f.name.upper()}"
        if key in env:
            values[f.name] = _coerce(env[key], current)
    # Platform conventions: Spaces/Docker set these, and they win over our defaults.
    for key in ("GRADIO_SERVER_PORT", "PORT"):
        if key in env and "port" not in values:
            values["port"] = int(env[key])
    if "GRADIO_SERVER_NAME" in env and "host" not in values:
        values["host"] = env["GRADIO_SERVER_NAME"]
    if "admin_token" not in values and env.get("ADMIN_TOKEN"):
        values["admin_token"] = env["ADMIN_TOKEN"]
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "data_dir" in values:
        values["data_dir"] = Path(values["data_dir"])
    return dataclasses.replace(base, **values).validate()


def resolve_device(requested: str = "auto") -> str:
    """``cuda`` when present unless told otherwise; the code runs the same on CPU."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(quantization: str, compute_dtype: str, device: str, role: str = "serve") -> tuple[str, str]:
    """Pick storage and compute precision per device and role (figures: docs/precision.md).

    Serving: NF4 storage everywhere; on CUDA with bfloat16 compute (the QLoRA recipe), on
    CPU with float32 compute, where bitsandbytes' packed NF4 kernel decoded SmolLM2 at 23.8
    tok/s vs 16.0 for plain float32 (1 thread, same run). Training on CPU (``role="train"``,
    the worker): float32, because a bfloat16 backward is ~30x slower there and NF4's
    backward takes the slower dequantize path.
    """
    cuda = device.startswith("cuda")
    if quantization == "auto":
        quantization = "fp32" if role == "train" and not cuda else "nf4"
    if compute_dtype == "auto":
        compute_dtype = "bfloat16" if quantization == "bf16" or cuda else "float32"
    return quantization, compute_dtype

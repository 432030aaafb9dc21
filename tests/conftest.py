"""Shared fixtures: the tiny offline model (built once per session) and a temp data dir."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from rlhf_demo.config import Settings, load_settings  # noqa: E402
from rlhf_demo.modeling import LoadedModel, load_model  # noqa: E402
from rlhf_demo.modeling.tiny import build_tiny_model  # noqa: E402


def wait_until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``condition`` (every 0.1 s) until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    """Settings for a fresh data dir serving the tiny model in float32 (fast, deterministic)."""
    return load_settings(env={}, model=str(tiny_model_dir), data_dir=tmp_path / "data", quantization="fp32")


@pytest.fixture
def tiny_loaded(settings: Settings) -> LoadedModel:
    """A fresh tiny base model per test (tests attach adapters to it)."""
    return load_model(settings)


def write_random_adapter(loaded: LoadedModel, settings: Settings, name: str, seed: int, scale: float = 0.5) -> Path:
    """Save a non-identity LoRA ``name`` (random B) under the data dir, leaving the model as it was.
    The same ``seed`` gives the same adapter in any test order: PEFT draws LoRA A from torch's
    global generator, which the tests before this one have moved (seeded here, then restored)."""
    import torch

    from rlhf_demo.modeling.adapters import attach_new_adapter, save_adapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = attach_new_adapter(loaded.model, name, settings.lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if f"lora_B.{name}." in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    folder = save_adapter(model, name, settings.adapters_dir / name)
    model.delete_adapter(name)
    loaded.model = model
    return folder


@pytest.fixture
def runtime(settings: Settings, tiny_loaded: LoadedModel):
    """A serving runtime (store + server with v0 active) on the tiny model."""
    from rlhf_demo.runtime import Runtime

    rt = Runtime(settings, tiny_loaded)
    yield rt
    rt.close()


@pytest.fixture
def app_url(runtime):
    """The app on a free 127.0.0.1 port (loopback only), closed after the test."""
    from rlhf_demo.ui.app import launch_local

    demo, url = launch_local(runtime)
    yield url
    demo.close()

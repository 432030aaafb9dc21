"""The CUDA path (skipped without a GPU; CI has none): NF4 storage + bfloat16 compute, the
way a GPU Space or the Docker CUDA image runs it. Serving, hot-swap, a PPO step, the reward
model and one whole worker cycle, each on the GPU. Run by ``bench/gpu.sh``."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import write_random_adapter
from test_worker_cycle import ALWAYS, cast_votes, small

from rlhf_demo.config import load_settings
from rlhf_demo.modeling import load_model
from rlhf_demo.modeling.adapters import adapter_state, attach_new_adapter
from rlhf_demo.ppo import PPOConfig, PPOTrainer, response_forward
from rlhf_demo.serving import Sampling

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def cuda_settings(tmp_path, tiny_model_dir):
    """What ``--quantization auto`` gives on a GPU: NF4 + bfloat16 compute, on cuda."""
    return load_settings(env={}, model=str(tiny_model_dir), data_dir=tmp_path / "data", device="cuda")


def test_auto_precision_on_cuda_is_nf4_with_bf16_compute(cuda_settings):
    loaded = load_model(cuda_settings)
    assert (loaded.quantization, loaded.compute_dtype, loaded.device) == ("nf4", torch.bfloat16, "cuda")
    import bitsandbytes as bnb

    layers = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" and m.compute_dtype == torch.bfloat16 for m in layers)


def test_serving_and_hot_swap_on_cuda(cuda_settings):
    from rlhf_demo.runtime import Runtime

    loaded = load_model(cuda_settings)
    runtime = Runtime(cuda_settings, loaded)
    try:
        # the GPU's measured defaults: best-of-8 answers, 64 rows a decode step (docs/benchmarks.md)
        assert (runtime.settings.selection.best_of, runtime.server.engine.max_batch) == (8, 64)
        before = runtime.server.generate(PROMPT, sampling=Sampling(0.0, 1.0, 12))
        streamed = list(runtime.server.stream(PROMPT, sampling=Sampling(0.0, 1.0, 12)))
        assert streamed[-1].text == before.text and len(streamed) > 2
        runtime.server.load_version("v1", write_random_adapter(loaded, cuda_settings, "v1", seed=1))
        runtime.server.swap_to("v1")
        after = runtime.server.generate(PROMPT, sampling=Sampling(0.0, 1.0, 12))
        assert after.version == "v1" and after.text != before.text
    finally:
        runtime.close()


def test_ppo_step_on_cuda_moves_the_policy_and_keeps_the_reference(cuda_settings):
    loaded = load_model(cuda_settings)
    policy = attach_new_adapter(loaded.model, "policy", cuda_settings.lora)
    config = PPOConfig(batch_size=8, mini_batch_size=4, samples_per_prompt=4, max_new_tokens=8, learning_rate=1e-2)
    torch.manual_seed(0)
    trainer = PPOTrainer(policy, loaded.tokenizer, lambda p, c, f: torch.randn(len(c)), config)
    prompts = [PROMPT, [{"role": "user", "content": "Say hello."}]]
    r = trainer.rollout(prompts)
    assert r.logprobs.device.type == "cuda" and torch.equal(r.logprobs, r.ref_logprobs)  # fresh LoRA = identity
    before = adapter_state(policy, "policy")
    stats = trainer.step(prompts)
    assert stats["updates"] >= 1 and all(math.isfinite(v) for v in stats.values())
    assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters() if n in before)
    batch = (r.query_ids, r.query_mask, r.response_ids, r.response_mask)
    with torch.no_grad(), policy.disable_adapter():
        ref_after = response_forward(policy, *batch, config.temperature).logprobs
    assert torch.equal(ref_after, r.ref_logprobs)


def test_reward_model_trains_on_cuda(cuda_settings):
    from rlhf_demo.reward import train_reward_model

    loaded = load_model(cuda_settings)
    pairs = [
        {"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": f"good answer {i}", "rejected": f"bad {i}"}
        for i in range(24)
    ]
    config = dataclasses.replace(cuda_settings.training.reward, max_length=64)
    rm, metrics = train_reward_model(loaded.model, loaded.tokenizer, pairs, [], config)
    assert metrics.pairs == 24 and metrics.agreement is not None and math.isfinite(metrics.reward_std)
    scores = rm.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    assert torch.isfinite(scores).all()


def test_a_whole_worker_cycle_on_cuda_publishes_and_the_server_swaps(cuda_settings):
    from rlhf_demo.runtime import Runtime
    from rlhf_demo.worker.cycle import run_cycle

    settings = small(cuda_settings)
    runtime = Runtime(settings, load_model(settings))
    try:
        cast_votes(runtime.store)
        summary = run_cycle(settings, runtime.store, load_model(settings), gate_config=ALWAYS)
        assert summary["decision"] == "published" and summary["version"] == "v1"
        assert runtime.sync_registry() == "v1"
        assert runtime.server.generate(PROMPT, sampling=Sampling(0.0, 1.0, 8)).version == "v1"
    finally:
        runtime.close()

"""PPO's sampler (rollouts, the gate, the learning benchmark) decodes through the serving
engine on the training model: generate's answers and layout, seeded, and an answer that has
ended costs no more forward rows."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rlhf_demo.modeling.adapters import attach_new_adapter, use_adapter
from rlhf_demo.modeling.loading import eos_token_ids, pad_token_id
from rlhf_demo.ppo import PPOConfig, truncate_at_eos
from rlhf_demo.ppo.trainer import sample

PROMPTS = [
    [{"role": "user", "content": text}]
    for text in ("Hello!", "What is the capital of France? One short sentence.", "one two", "Tell me about Rome and the sea.")
]
CONFIG = PPOConfig(batch_size=4, mini_batch_size=2, samples_per_prompt=2, max_new_tokens=12)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def policy(tiny_loaded, settings):
    """A policy adapter with a visible effect, and extra EOS ids (chat models list several in the
    generation config) so that some answers end early and some run to the length cap."""
    torch.manual_seed(0)
    model = attach_new_adapter(tiny_loaded.model, "policy", settings.lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.policy." in name:
                p.normal_(0.0, 0.05)
    tok = tiny_loaded.tokenizer
    model.generation_config.eos_token_id = [tok.eos_token_id, *range(7, len(tok), 7)]
    return model


def test_greedy_answers_and_layout_equal_generate_cut_at_eos(policy, tiny_loaded):
    tok = tiny_loaded.tokenizer
    greedy = dataclasses.replace(CONFIG, temperature=0.0)
    with use_adapter(policy, "policy"):
        got = sample(policy, tok, PROMPTS, greedy)
        eos_ids, pad_id = eos_token_ids(policy, tok), pad_token_id(policy, tok)
        written = policy.generate(
            input_ids=got.query_ids,
            attention_mask=got.query_mask,
            do_sample=False,
            max_new_tokens=greedy.max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
        )
    ids, mask, has_eos = truncate_at_eos(written[:, got.query_ids.shape[1] :], eos_ids, pad_id)
    assert got.has_eos.any() and not got.has_eos.all(), "the EOS ids should end some answers, not all"
    assert torch.equal(got.response_ids, ids) and torch.equal(got.response_mask, mask) and torch.equal(got.has_eos, has_eos)
    assert got.completions == [tok.decode(i[m], skip_special_tokens=True).strip() for i, m in zip(ids, mask, strict=True)]


def test_sampling_is_reproducible_from_the_global_seed(policy, tiny_loaded):
    with use_adapter(policy, "policy"):
        runs = []
        for seed in (5, 5, 6):
            torch.manual_seed(seed)
            runs.append(sample(policy, tiny_loaded.tokenizer, PROMPTS * 2, CONFIG))
    same, other = runs[0], runs[2]
    assert torch.equal(same.response_ids, runs[1].response_ids) and same.completions == runs[1].completions
    assert not torch.equal(same.response_ids[:, :3], other.response_ids[:, :3])


def test_an_answer_that_ended_costs_no_more_forward_rows(policy, tiny_loaded, monkeypatch):
    rows_per_forward: list[int] = []
    forward = policy.forward
    monkeypatch.setattr(policy, "forward", lambda *a, **k: rows_per_forward.append(k["input_ids"].shape[0]) or forward(*a, **k))
    with use_adapter(policy, "policy"):
        torch.manual_seed(1)
        got = sample(policy, tiny_loaded.tokenizer, PROMPTS * 2, CONFIG)
    lengths = got.response_mask.sum(dim=1)
    prefill, *steps = rows_per_forward
    assert prefill == len(PROMPTS) * 2
    # the prefill writes every answer's first token, then one row per further token: nothing for
    # answers that have ended (generate would run every row until the longest one ends)
    assert sum(steps) == int((lengths - 1).sum()) < len(steps) * prefill

"""PPO trainer on the tiny model: reference = adapters off, alignment with left padding,
gradient isolation, learning a synthetic reward, EOS masks, saving, one base copy."""

from __future__ import annotations

import dataclasses
import gc
import math

import pytest
import torch

from rlhf_demo.config import load_settings
from rlhf_demo.modeling import load_model
from rlhf_demo.modeling.adapters import adapter_state, attach_new_adapter, restore_adapter_state
from rlhf_demo.modeling.heads import HEAD_FILE, ScalarHead, hidden_size
from rlhf_demo.modeling.loading import eos_token_ids, pad_token_id
from rlhf_demo.ppo import PPOConfig, PPOTrainer, response_forward, truncate_at_eos
from rlhf_demo.ppo.rollouts import encode_answers

PROMPTS = [
    "Hello!",
    "What is the capital of France? Please answer in one short sentence.",
    "one two",
    "Thanks for asking: tell me a story about Rome, Paris and the sea.",
]
FAST = PPOConfig(
    batch_size=4, mini_batch_size=2, ppo_epochs=2, max_new_tokens=8, samples_per_prompt=2
)  # RLOO, the default estimator
GAE = dataclasses.replace(FAST, advantage="gae", samples_per_prompt=1)  # value head


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hidden size 64 gains nothing from threads; on a busy 2-core box OpenMP
    spin-waiting makes these tests several times slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def random_reward(prompts, completions, finished) -> torch.Tensor:
    return torch.randn(len(completions))


def perturb(model, adapter: str, std: float = 0.05) -> None:
    """Give a fresh LoRA (B = 0, the identity) a visible effect."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                p.normal_(0.0, std)


def plain_logprobs(lm, query: torch.Tensor, response: torch.Tensor, temp: float):
    """Oracle: an unpadded HF forward, full log_softmax, logits at t predict t + 1."""
    ids = torch.cat([query, response]).unsqueeze(0)
    logits = lm(input_ids=ids).logits[0, len(query) - 1 : -1] / temp
    return torch.log_softmax(logits.float(), -1).gather(-1, response[:, None])[:, 0]


@pytest.fixture
def policy(tiny_loaded, settings):
    torch.manual_seed(0)
    return attach_new_adapter(tiny_loaded.model, "policy", settings.lora)


# ── EOS truncation ───────────────────────────────────────────────────────────────────


def test_truncate_at_eos_hand_made():
    eos, pad = 2, 0
    generated = torch.tensor(
        [
            [5, 7, 2, 9, 2],  # ends at the first EOS, kept as its last token
            [5, 6, 7, 8, 9],  # never ends: all kept, has_eos False
            [2, 3, 3, 3, 3],  # EOS first: a one-token answer
        ]
    )
    ids, mask, has_eos = truncate_at_eos(generated, [eos], pad)
    assert ids.tolist() == [[5, 7, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]
    # all rows end early: trailing all-padding columns are dropped; several EOS ids
    ids, mask, has_eos = truncate_at_eos(torch.tensor([[4, 2, 0, 0], [1, 4, 4, 4]]), [2, 1], 0)
    assert ids.tolist() == [[4, 2], [1, 0]] and mask.tolist() == [[1, 1], [1, 0]]
    assert has_eos.tolist() == [True, True]


def test_rollout_masks_match_the_eos(policy, tiny_loaded):
    tok = tiny_loaded.tokenizer
    torch.manual_seed(1)
    told: list[bool] = []

    def reward(prompts, completions, finished):
        told.extend(finished)
        return torch.randn(len(completions))

    trainer = PPOTrainer(policy, tok, reward, GAE)
    prompts = [user(p) for p in PROMPTS * 2]
    # the random tiny model hardly ever samples EOS: declare every 6th token id an extra
    # EOS id in the generation config (chat models list several there), so some answers
    # end and some do not; the one EOS rule (eos_token_ids) must pick them all up
    policy.generation_config.eos_token_id = [tok.eos_token_id, *range(6, len(tok), 6)]
    eos_ids, pad_id = eos_token_ids(policy, tok), pad_token_id(policy, tok)
    assert len(eos_ids) > 2
    r = trainer.rollout(prompts)
    lengths = r.response_mask.sum(1)
    for i, (ids, keep, ended, n) in enumerate(zip(r.response_ids, r.response_mask, r.has_eos, lengths, strict=True)):
        real = ids[keep].tolist()
        assert keep[:n].all() and not keep[n:].any()  # right padding only
        ends = [j for j, token in enumerate(real) if token in eos_ids]
        assert bool(ends) == bool(ended)
        if ended:
            assert ends == [len(real) - 1]  # the first EOS is the last real token
        assert (ids[~keep] == pad_id).all()
        for t in (r.logprobs, r.ref_logprobs, r.values, r.entropy):
            assert torch.isfinite(t[i]).all() and (t[i][~keep] == 0).all()
    assert r.has_eos.any() and not r.has_eos.all()
    assert told == r.has_eos.tolist()  # the reward function learns which answers were cut off
    assert r.response_ids.shape[1] <= FAST.max_new_tokens


# ── reference = base; alignment with left padding ────────────────────────────────────


def test_reference_is_the_base_exactly_with_left_padding(policy, tiny_loaded, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    perturb(policy, "policy")  # so that the policy differs from the reference
    cfg = PPOConfig(batch_size=4, mini_batch_size=2, max_new_tokens=8, temperature=0.7)
    torch.manual_seed(0)
    trainer = PPOTrainer(policy, tiny_loaded.tokenizer, random_reward, cfg)
    r = trainer.rollout([user(p) for p in PROMPTS])
    assert (r.query_mask == 0).any(), "prompts of different lengths: left padding"
    assert (r.query_mask[:, -1] == 1).all()

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    batch = (r.query_ids, r.query_mask, r.response_ids, r.response_mask)
    with torch.no_grad():
        # the same computation on a base that never saw PEFT: bit-identical
        ref_fresh = response_forward(fresh, *batch, temperature=0.7).logprobs
        assert torch.equal(r.ref_logprobs, ref_fresh)
        # each row alone, unpadded, through the plain HF forward
        for i in range(len(PROMPTS)):
            query = r.query_ids[i][r.query_mask[i].bool()]
            response = r.response_ids[i][r.response_mask[i]]
            n = len(response)
            expected = plain_logprobs(fresh, query, response, 0.7)
            assert torch.allclose(r.ref_logprobs[i, :n], expected, atol=1e-5, rtol=0)
            with policy.disable_adapter():  # adapters off = the base
                expected_peft = plain_logprobs(policy, query, response, 0.7)
            assert torch.allclose(r.ref_logprobs[i, :n], expected_peft, atol=1e-5, rtol=0)
            expected_policy = plain_logprobs(policy, query, response, 0.7)
            assert torch.allclose(r.logprobs[i, :n], expected_policy, atol=1e-5, rtol=0)
    assert (r.logprobs - r.ref_logprobs).abs().max() > 1e-3  # the policy is not the reference


def test_policy_changes_and_reference_stays_after_a_step(policy, tiny_loaded):
    tok = tiny_loaded.tokenizer
    attach_new_adapter(policy, "reward", load_settings(env={}).lora)
    perturb(policy, "reward")
    torch.manual_seed(0)
    trainer = PPOTrainer(policy, tok, random_reward, PPOConfig(**{**FAST.__dict__, "learning_rate": 1e-2}))
    r = trainer.rollout([user(p) for p in PROMPTS])
    batch = (r.query_ids, r.query_mask, r.response_ids, r.response_mask)
    others = {n: p.detach().clone() for n, p in policy.named_parameters() if ".policy." not in n}
    stats = trainer.step([user(p) for p in PROMPTS])
    assert stats["updates"] >= 1
    with torch.no_grad():
        with policy.disable_adapter():
            ref_after = response_forward(policy, *batch, temperature=FAST.temperature).logprobs
        policy_after = response_forward(policy, *batch, temperature=FAST.temperature).logprobs
    assert torch.equal(ref_after, r.ref_logprobs)
    assert (policy_after - r.logprobs).abs().max() > 1e-4
    for name, p in policy.named_parameters():  # base and the "reward" adapter untouched
        if name in others:
            assert torch.equal(p, others[name]), name
    assert policy.active_adapter == "policy"


# ── gradient isolation ───────────────────────────────────────────────────────────────


def test_gradients_reach_only_policy_lora_and_value_head(policy, tiny_loaded, settings):
    attach_new_adapter(policy, "reward", settings.lora)
    policy.set_adapter("reward")  # another trainer used the base last
    # PEFT's own rule, which the trainer relies on: set_adapter makes that adapter trainable
    policy.set_adapter("policy")
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".policy." in n for n in trainable)
    policy.set_adapter("reward")

    torch.manual_seed(0)
    trainer = PPOTrainer(policy, tiny_loaded.tokenizer, random_reward, GAE)
    policy.set_adapter("reward")  # and again, between construction and step
    seen: list[set[str]] = []
    step = trainer.optimizer.step

    def record_then_step(*args, **kwargs):
        seen.append({n for n, p in policy.named_parameters() if p.grad is not None})
        head = [p.grad for p in trainer.value_head.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in head)
        return step(*args, **kwargs)

    trainer.optimizer.step = record_then_step
    trainer.step([user(p) for p in PROMPTS])
    assert seen
    policy_names = {n for n in dict(policy.named_parameters()) if "lora_" in n and ".policy." in n}
    assert all(names == policy_names for names in seen)
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    expected = {id(p) for n, p in policy.named_parameters() if n in policy_names}
    assert optimised == expected | {id(p) for p in trainer.value_head.parameters()}


def test_a_reward_function_that_switches_adapters_does_not_affect_ppo(policy, tiny_loaded, settings):
    """The reward function shares the model and may leave another adapter active, trainable,
    in train mode: the step must sample, update and end exactly as with one that does not."""
    attach_new_adapter(policy, "reward", settings.lora)
    perturb(policy, "reward")
    policy.eval()
    start = adapter_state(policy, "policy")
    reward_before = adapter_state(policy, "reward")

    def quiet(prompts, completions, finished):
        return torch.tensor([float(len(c)) for c in completions])

    def meddling(prompts, completions, finished):
        policy.set_adapter("reward")
        for p in policy.parameters():
            p.requires_grad_(True)
        policy.train()
        return quiet(prompts, completions, finished)

    runs = []
    for reward_fn in (quiet, meddling):
        restore_adapter_state(policy, "policy", start)
        torch.manual_seed(0)
        trainer = PPOTrainer(policy, tiny_loaded.tokenizer, reward_fn, FAST)
        stats = [trainer.step([user(p) for p in PROMPTS]) for _ in range(2)]
        runs.append((stats, adapter_state(policy, "policy")))
        assert policy.active_adapter == "policy" and not policy.training
    (quiet_stats, quiet_after), (meddling_stats, meddling_after) = runs
    drop = ("time_s", "rollout_s")
    assert [{k: v for k, v in s.items() if k not in drop} for s in meddling_stats] == [
        {k: v for k, v in s.items() if k not in drop} for s in quiet_stats
    ]
    assert all(torch.equal(meddling_after[n], quiet_after[n]) for n in quiet_after)
    assert any(not torch.equal(quiet_after[n], start[n]) for n in start)  # the steps did update
    assert all(torch.equal(p, reward_before[n]) for n, p in adapter_state(policy, "reward").items())


def test_rloo_trains_the_policy_lora_alone_without_a_value_head(policy, tiny_loaded, settings):
    attach_new_adapter(policy, "reward", settings.lora)
    torch.manual_seed(0)
    trainer = PPOTrainer(policy, tiny_loaded.tokenizer, random_reward, FAST)
    assert trainer.value_head is None
    policy_names = {n for n in dict(policy.named_parameters()) if "lora_" in n and ".policy." in n}
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for n, p in policy.named_parameters() if n in policy_names}
    before = adapter_state(policy, "policy")
    stats = trainer.step([user(p) for p in PROMPTS])
    assert stats["updates"] >= 1 and "value_loss" not in stats
    changed = [n for n, p in policy.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed and all(".policy." in n for n in changed)


# ── learning ─────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("advantage", ["rloo", "gae"])
def test_ppo_raises_a_synthetic_reward_within_the_kl_target(policy, tiny_loaded, advantage):
    """Reward: how many word-start tokens (the 32 of the tiny vocabulary that hold a
    space) an answer uses, normalised to mean 0 / std 1 under the base policy, as the
    worker's reward normaliser does. 64 answers x 8 tokens per iteration: with 8 x 16
    the random tiny model's signal stays below its sampling noise (measured: gains of
    -0.1 to +0.4 std in 10 iterations, depending on the seed, while KL drifts to 3-9).
    The KL term of the loss is off: the reward's adaptive KL penalty is what this test
    holds to the target (the loss term has its own tests below); with it on (0.2), 10
    iterations gained only +0.08 to +0.30 std (RLOO) and -0.03 to +0.26 (GAE) over seeds."""
    prompts = [user(p) for p in PROMPTS]
    norm = {"mean": 0.0, "std": 1.0}

    def spaces(_prompts, completions, _finished):
        raw = torch.tensor([float(c.count(" ")) for c in completions])
        return (raw - norm["mean"]) / norm["std"]

    cfg = PPOConfig(
        batch_size=64,
        mini_batch_size=16,
        ppo_epochs=4,
        max_new_tokens=8,
        learning_rate=2e-3,
        init_kl_coef=0.1,
        kl_loss_coef=0.0,
        advantage=advantage,
        samples_per_prompt=16 if advantage == "rloo" else 1,
        kl_stop=None,
    )
    torch.manual_seed(0)
    trainer = PPOTrainer(policy, tiny_loaded.tokenizer, spaces, cfg)
    base = trainer.rollout(prompts * 16).raw_scores
    norm.update(mean=base.mean().item(), std=base.std().item())

    result = trainer.train(prompts, steps=10)
    history = result.history
    assert result.kept_updates == 10 and result.stopped is None
    scores = [h["score"] for h in history]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    # Measured on a 2-core AMD EPYC (AVX-512), seeds 0-11 for the adapter and sampling, one
    # thread (this module's fixture; two threads gave identical figures for seed 0): gain
    # RLOO +0.25 to +0.74 std (mean 0.45, sd 0.13), GAE +0.29 to +0.54 (mean 0.40, sd 0.07);
    # max KL RLOO 3.0 to 5.5 nats (mean 3.8, sd 0.65), GAE 3.3 to 4.1. The bound on the gain
    # sits more than 3 sd below the RLOO mean.
    assert last - first > 0.05, scores
    assert max(h["kl"] for h in history) < cfg.target_kl, [h["kl"] for h in history]
    assert history[-1]["kl"] > 0.1  # the policy did move away from the reference
    for h in history:
        assert all(isinstance(v, float) and math.isfinite(v) for v in h.values())
    assert {
        "score",
        "kl",
        "kl_coef",
        "policy_loss",
        "approx_kl",
        "clipfrac",
        "entropy",
        "response_length",
        "has_eos",
        "time_s",
    } | ({"value_loss"} if advantage == "gae" else set()) <= set(history[0])


def test_train_time_budget_and_progress(policy, tiny_loaded):
    torch.manual_seed(0)
    trainer = PPOTrainer(policy, tiny_loaded.tokenizer, random_reward, dataclasses.replace(FAST, kl_stop=None))
    calls = []
    prompts = [user(p) for p in PROMPTS]
    result = trainer.train(prompts, 5, max_seconds=0.0, progress=lambda *a: calls.append(a))
    assert len(result.history) == 1 and calls == [(1, 5, result.history[0])]  # the first step always runs
    assert result.stopped == "time budget" and result.kept_updates == 1
    result = trainer.train(prompts, 2, progress=lambda *a: calls.append(a))
    assert len(result.history) == 2 and [c[:2] for c in calls[1:]] == [(1, 2), (2, 2)] and result.stopped is None


def test_train_cycles_through_the_prompts_k_answers_each(policy, tiny_loaded):
    seen: list[str] = []

    def reward(prompts, completions, finished):
        seen.extend(p[-1]["content"] for p in prompts)
        return torch.zeros(len(completions))

    trainer = PPOTrainer(policy, tiny_loaded.tokenizer, reward, dataclasses.replace(FAST, kl_stop=None))
    trainer.train([user(p) for p in PROMPTS[:3]], 2)  # 2 prompts a step, 2 answers each
    assert seen == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2 + [PROMPTS[2]] * 2 + [PROMPTS[0]] * 2


class KLRamp:
    """A stand-in for ``PPOTrainer.step``: the rollout's KL is the policy's LoRA B[0, 0]
    (the state the step starts from); a step under the bound adds 1 to it (the update)."""

    def __init__(self, model) -> None:
        self.model = model
        self.name = next(n for n in dict(model.named_parameters()) if "lora_B.policy" in n)

    @property
    def weight(self) -> float:
        return float(dict(self.model.named_parameters())[self.name][0, 0].detach())

    def rollout_kl(self) -> float:
        return self.weight

    def __call__(self, prompts, kl_stop=None) -> dict:
        kl = self.rollout_kl()
        if kl_stop is not None and kl > kl_stop:
            return {"kl": kl, "kl_stop": 1.0, "time_s": 0.0}
        with torch.no_grad():
            dict(self.model.named_parameters())[self.name][0, 0] += 1.0
        return {"kl": kl, "time_s": 0.0}


def test_train_stops_past_the_kl_bound_and_undoes_the_last_update(policy, tiny_loaded):
    trainer = PPOTrainer(policy, tiny_loaded.tokenizer, random_reward, dataclasses.replace(FAST, kl_stop=2.5))
    trainer.step = ramp = KLRamp(policy)
    logged = []
    result = trainer.train([user(p) for p in PROMPTS], 10, progress=lambda i, n, s: logged.append(s["kl"]))
    # KL per step: 0, 1, 2, 3 > 2.5 -> the update that led to 3 is undone: the policy keeps KL 2.
    assert logged == [0.0, 1.0, 2.0, 3.0]
    assert ramp.weight == 2.0 and result.kept_updates == 2 and result.stopped.startswith("KL 3.00")


def test_train_runs_every_step_within_the_kl_bound(policy, tiny_loaded):
    trainer = PPOTrainer(policy, tiny_loaded.tokenizer, random_reward, dataclasses.replace(FAST, kl_stop=100.0))
    trainer.step = ramp = KLRamp(policy)
    result = trainer.train([user(p) for p in PROMPTS], 4)
    assert ramp.weight == 4.0 and result.kept_updates == 4 and result.stopped is None


def test_missing_eos_penalty_applies_to_unfinished_answers(policy, tiny_loaded):
    cfg = PPOConfig(**{**FAST.__dict__, "missing_eos_penalty": 1.5})
    trainer = PPOTrainer(policy, tiny_loaded.tokenizer, lambda p, c, f: torch.ones(len(c)), cfg)
    r = trainer.rollout([user(p) for p in PROMPTS])
    assert torch.equal(r.raw_scores, torch.ones(4))
    assert torch.equal(r.scores, torch.where(r.has_eos, 1.0, -0.5))


# ── memory: logits only for response tokens, in chunks ───────────────────────────────


def test_logits_only_for_response_tokens_in_chunks(policy, tiny_loaded):
    torch.manual_seed(0)
    trainer = PPOTrainer(policy, tiny_loaded.tokenizer, random_reward, GAE)
    r = trainer.rollout([user(p) for p in PROMPTS])
    rows: list[int] = []
    lm_head = policy.get_base_model().lm_head
    hook = lm_head.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    try:
        batch = (r.query_ids, r.query_mask, r.response_ids, r.response_mask)
        with torch.no_grad():
            lp = response_forward(policy, *batch, FAST.temperature, chunk_rows=5).logprobs
        assert max(rows) <= 5 and sum(rows) == int(r.response_mask.sum())
        rows.clear()
        lp_grad, v = response_forward(policy, *batch, FAST.temperature, trainer.value_head, chunk_rows=5)[:2]
        (lp_grad.sum() + v.sum()).backward()  # checkpointed chunks recompute in backward
        assert max(rows) <= 5 and sum(rows) == 2 * int(r.response_mask.sum())
    finally:
        hook.remove()
    assert torch.allclose(lp, lp_grad.detach(), atol=1e-6)
    assert torch.allclose(lp, r.logprobs, atol=1e-6)


def test_a_single_chunk_is_not_recomputed_and_gives_the_chunked_gradients(policy, tiny_loaded):
    """Recomputing in backward only saves memory across several chunks; one chunk (a PPO
    minibatch) runs the lm_head once per pass, with the same log-probs, KL and gradients."""
    torch.manual_seed(0)
    perturb(policy, "policy")
    trainer = PPOTrainer(policy, tiny_loaded.tokenizer, random_reward, FAST)
    r = trainer.rollout([user(p) for p in PROMPTS])
    batch = (r.query_ids, r.query_mask, r.response_ids, r.response_mask)
    params = [p for n, p in policy.named_parameters() if p.requires_grad]
    rows: list[int] = []
    hook = policy.get_base_model().lm_head.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    results = {}
    try:
        for chunk in (5, 10_000):
            rows.clear()
            out = response_forward(policy, *batch, FAST.temperature, chunk_rows=chunk, reference_hidden=r.ref_hidden)
            (out.logprobs.sum() + out.kl.sum()).backward()
            results[chunk] = (out.logprobs.detach(), out.kl.detach(), [p.grad.clone() for p in params], sum(rows))
            for p in params:
                p.grad = None
    finally:
        hook.remove()
    tokens = int(r.response_mask.sum())
    assert results[5][3] == 4 * tokens  # policy + reference rows, then both again in backward
    assert results[10_000][3] == 2 * tokens  # once each
    for a, b in zip(results[5][:2] + tuple(results[5][2]), results[10_000][:2] + tuple(results[10_000][2]), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)  # float sums in another order


# ── saving, one base copy, NF4 ───────────────────────────────────────────────────────


def test_saved_policy_and_value_head_reload_bit_identically(policy, tiny_loaded, tmp_path, tiny_model_dir):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    trainer = PPOTrainer(policy, tiny_loaded.tokenizer, random_reward, GAE)
    trainer.step([user(p) for p in PROMPTS])
    folder = trainer.save_policy(tmp_path / "v1")
    assert (folder / "adapter_config.json").is_file() and (folder / HEAD_FILE).is_file()

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(fresh, str(folder), adapter_name="policy")
    saved = get_peft_model_state_dict(policy, adapter_name="policy")
    reloaded = get_peft_model_state_dict(loaded, adapter_name="policy")
    assert saved.keys() == reloaded.keys() and saved
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)
    head = ScalarHead.load(folder, hidden_size(fresh))
    for k, v in trainer.value_head.state_dict().items():
        assert torch.equal(head.state_dict()[k], v)


def test_process_holds_one_copy_of_the_base(tiny_loaded, settings):
    from transformers import PreTrainedModel

    base = tiny_loaded.model
    pointers = {n: p.data_ptr() for n, p in base.named_parameters()}
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, PreTrainedModel)}
    peft = attach_new_adapter(base, "policy", settings.lora)
    torch.manual_seed(0)
    trainer = PPOTrainer(peft, tiny_loaded.tokenizer, random_reward, FAST)
    trainer.step([user(p) for p in PROMPTS])
    assert peft.get_base_model() is base
    after = {n.replace(".base_layer", ""): p for n, p in base.named_parameters() if "lora_" not in n}
    assert after.keys() == pointers.keys()
    for name, ptr in pointers.items():
        assert after[name].data_ptr() == ptr, name
    gc.collect()
    new_models = [o for o in gc.get_objects() if isinstance(o, PreTrainedModel) and id(o) not in before]
    assert new_models == []  # no deepcopy / second load of the base anywhere


@pytest.mark.filterwarnings("error:.*autograd kernel was not registered")  # grads through bnb's inference kernel
def test_runs_on_an_nf4_base(tiny_model_dir, tmp_path):
    try:
        settings = load_settings(
            env={}, model=str(tiny_model_dir), data_dir=tmp_path, quantization="nf4", compute_dtype="float32", device="cpu"
        )
        loaded = load_model(settings)
    except Exception as exc:  # noqa: BLE001 - a bitsandbytes build without CPU 4-bit
        pytest.skip(f"NF4 unavailable here: {exc}")
    ids = loaded.tokenizer("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        loaded.model.eval()(ids)  # as serving would: lets bitsandbytes repack CPU weights
    peft = attach_new_adapter(loaded.model, "policy", settings.lora)
    torch.manual_seed(0)
    trainer = PPOTrainer(peft, loaded.tokenizer, random_reward, GAE)
    r = trainer.rollout([user(p) for p in PROMPTS])
    assert torch.equal(r.logprobs, r.ref_logprobs)  # fresh LoRA = identity
    batch = (r.query_ids, r.query_mask, r.response_ids, r.response_mask)
    lp, v = response_forward(peft, *batch, FAST.temperature, trainer.value_head)[:2]
    (lp.sum() + v.sum()).backward()
    for p in trainer.policy_params:  # B of every layer (A's grads are 0 while B = 0)
        assert p.grad is not None
    assert all(p.grad.abs().sum() > 0 for n, p in peft.named_parameters() if "lora_B.policy" in n)
    trainer.optimizer.zero_grad(set_to_none=True)
    stats = trainer.step([user(p) for p in PROMPTS])
    assert math.isfinite(stats["policy_loss"]) and math.isfinite(stats["value_loss"])
    with torch.no_grad(), peft.disable_adapter():
        ref_after = response_forward(peft, *batch, FAST.temperature).logprobs
    assert torch.equal(ref_after, r.ref_logprobs)


def test_rejects_a_model_without_the_adapter(policy, tiny_loaded):
    with pytest.raises(ValueError, match="no adapter named"):
        PPOTrainer(policy, tiny_loaded.tokenizer, random_reward, FAST, policy_adapter="nope")


class NoisyKL(KLRamp):
    """Rollout KL read from a list (a noisy first batch), one update per step."""

    def __init__(self, model, kls: list[float]) -> None:
        super().__init__(model)
        self.kls = iter(kls)

    def rollout_kl(self) -> float:
        return next(self.kls)


def test_a_noisy_first_batch_does_not_end_training(policy, tiny_loaded):
    """The first rollouts show the starting policy (which the gate measured on more answers), not
    an update of this call: a batch of 32 answers reads its KL ±1 nat, so one high reading must
    not throw the cycle away (measured runs lost their last cycle this way)."""
    trainer = PPOTrainer(policy, tiny_loaded.tokenizer, random_reward, dataclasses.replace(FAST, kl_stop=2.5))
    trainer.step = NoisyKL(policy, [3.0, 1.5, 2.0])
    result = trainer.train([user(p) for p in PROMPTS], 3)
    assert result.kept_updates == 3 and result.stopped is None


# ── the exact KL to the reference in the loss ───────────────────────────────────────


def test_response_forward_gives_the_exact_kl_to_the_reference(policy, tiny_loaded):
    """The per-token KL from the reference's kept hidden states equals KL(pi || pi_ref)
    computed from both models' full logits, and is 0 for the reference itself."""
    perturb(policy, "policy")
    trainer = PPOTrainer(policy, tiny_loaded.tokenizer, random_reward, dataclasses.replace(FAST, kl_loss_coef=1.0))
    torch.manual_seed(0)
    r = trainer.rollout([user(p) for p in PROMPTS])
    assert r.ref_hidden is not None and r.ref_hidden.shape[:2] == r.response_ids.shape
    batch = (r.query_ids, r.query_mask, r.response_ids, r.response_mask)
    temp = FAST.temperature
    with torch.no_grad():
        kl = response_forward(policy, *batch, temp, reference_hidden=r.ref_hidden).kl
        lm = policy.get_base_model()
        for i, (q, qm, a, am) in enumerate(zip(*batch, strict=True)):
            ids = torch.cat([q[qm.bool()], a[am.bool()]]).unsqueeze(0)
            start = int(qm.sum()) - 1
            logp = torch.log_softmax(lm(input_ids=ids).logits[0, start:-1].float() / temp, -1)
            with policy.disable_adapter():
                ref = torch.log_softmax(lm(input_ids=ids).logits[0, start:-1].float() / temp, -1)
            expected = (logp.exp() * (logp - ref)).sum(-1)
            n = int(am.sum())
            assert torch.allclose(kl[i, :n], expected, atol=1e-5), (kl[i, :n], expected)
            assert (kl[i, n:] == 0).all() and (expected > 1e-4).all()
        with policy.disable_adapter():
            assert response_forward(policy, *batch, temp, reference_hidden=r.ref_hidden).kl.abs().max() < 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_kl_loss_keeps_noise_from_moving_the_policy(policy, tiny_loaded, seed):
    """With a reward that is pure noise, every update is drift away from the reference. The
    KL penalty in the reward (a one-sample estimate per answer, itself noisy) lets it grow;
    the exact KL in the loss pulls it back."""
    prompts = [user(p) for p in PROMPTS]
    base = adapter_state(policy, "policy")
    kl = {}
    arms = {
        "in the reward": {"init_kl_coef": 0.15, "kl_loss_coef": 0.0},
        "in the loss": {"init_kl_coef": 0.0, "kl_loss_coef": 1.0},
    }
    for arm, penalty in arms.items():
        torch.manual_seed(seed)
        restore_adapter_state(policy, "policy", base)
        cfg = PPOConfig(batch_size=32, mini_batch_size=8, max_new_tokens=8, learning_rate=1e-2, kl_stop=None, **penalty)
        trainer = PPOTrainer(policy, tiny_loaded.tokenizer, random_reward, cfg)
        trainer.train(prompts, steps=6)
        with torch.no_grad():
            r = trainer.rollout(prompts * 16)
        kl[arm] = (r.logprobs - r.ref_logprobs).sum(1).mean().item()
    # measured, seeds 0-2: 8.1-10.8 nats in the reward, 1.4-1.7 in the loss
    assert kl["in the loss"] < 0.5 * kl["in the reward"], kl


@pytest.mark.parametrize("advantage", ["rloo", "gae"])
def test_the_kl_loss_pulls_a_drifted_policy_back_with_either_estimator(policy, tiny_loaded, advantage):
    """A reward that says nothing (constant: every advantage is 0) leaves the KL term as the
    only force on the policy, so a step must bring a drifted policy closer to the reference,
    with the value head's loss in the sum too (GAE)."""
    prompts = [user(p) for p in PROMPTS]
    perturb(policy, "policy", std=0.2)
    cfg = PPOConfig(
        batch_size=8,
        mini_batch_size=4,
        max_new_tokens=8,
        learning_rate=1e-2,
        kl_stop=None,
        kl_loss_coef=1.0,
        advantage=advantage,
        samples_per_prompt=2 if advantage == "rloo" else 1,
    )
    trainer = PPOTrainer(policy, tiny_loaded.tokenizer, lambda p, c, f: torch.zeros(len(c)), cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        probe = trainer.rollout(prompts * 4)
    batch = (probe.query_ids, probe.query_mask, probe.response_ids, probe.response_mask)

    def kl_on_probe() -> float:
        with torch.no_grad():
            out = response_forward(policy, *batch, cfg.temperature, reference_hidden=probe.ref_hidden)
        return (out.kl * probe.response_mask).sum().item() / probe.response_mask.sum().item()

    before = kl_on_probe()
    trainer.train(prompts, steps=4)
    after = kl_on_probe()
    assert after < 0.9 * before, (before, after)  # measured: 3.06 -> 2.51 (RLOO), 2.47 (GAE); 3.06 when the term was lost


# ── the voters' preferred answers in the loss ────────────────────────────────────────


def test_written_answers_end_with_the_eos_only_when_they_ended_within_the_limit(tiny_loaded):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    eos = set(eos_token_ids(model, tok))
    prompts = [user("Hello!"), user("one two three four five"), user("Hi")]
    long_text = " ".join(["word"] * 50)
    enc = encode_answers(model, tok, prompts, ["Hi there!", long_text, "Cut short"], [True, True, False], max_new_tokens=8)
    lengths = enc.response_mask.sum(1).tolist()
    last = [int(enc.response_ids[i, n - 1]) for i, n in enumerate(lengths)]
    assert last[0] in eos and enc.has_eos.tolist() == [True, False, False]
    assert lengths[1] == 8 and last[1] not in eos  # cut at the rollout limit: no end claimed
    assert last[2] not in eos
    assert (enc.query_mask[:, -1] == 1).all()  # left padded: every prompt ends where its answer starts


def test_the_likelihood_term_moves_the_policy_toward_the_voters_answers(policy, tiny_loaded):
    """With a reward that says nothing, the term is the only pull toward the preferred answers:
    their log-likelihood must rise well beyond what the same steps without it give."""
    prompts = [user(p) for p in PROMPTS]
    tok = tiny_loaded.tokenizer
    chosen = [(user(p), "Happy to help! What a great question!", True) for p in PROMPTS[:2]]
    enc = encode_answers(policy, tok, [c[0] for c in chosen], [c[1] for c in chosen], [True, True], 8)
    batch = (enc.query_ids, enc.query_mask, enc.response_ids, enc.response_mask)
    base = adapter_state(policy, "policy")
    gained, stats = {}, {}
    for coef in (0.0, 1.0):
        torch.manual_seed(0)
        restore_adapter_state(policy, "policy", base)
        cfg = dataclasses.replace(FAST, learning_rate=1e-2, kl_stop=None, chosen_loss_coef=coef)
        trainer = PPOTrainer(policy, tok, lambda p, c, f: torch.zeros(len(c)), cfg, chosen=chosen)
        with torch.no_grad(), trainer.as_policy():
            before = response_forward(policy, *batch, cfg.temperature).logprobs.sum().item()
        result = trainer.train(prompts, steps=3)
        with torch.no_grad(), trainer.as_policy():
            gained[coef] = response_forward(policy, *batch, cfg.temperature).logprobs.sum().item() - before
        stats[coef] = result.last
    assert "chosen_nll" in stats[1.0] and "chosen_nll" not in stats[0.0]
    assert gained[1.0] > gained[0.0] + 20.0, gained  # measured: +98.4 nats with it, -1.8 without


def test_each_preferred_answer_enters_every_epoch_once_however_few_there_are(policy, tiny_loaded):
    """A single 👍 answer must not fill every minibatch: repeated 4x a minibatch, one answer
    was learned by heart within two steps (NLL 0.6 -> 0.07 nats a token) and the rollouts'
    KL passed the stop (keyword, 200 votes). Each answer weighs like one rollout, once an epoch,
    and never more of them than the rollouts."""
    prompts = [user(p) for p in PROMPTS]
    for count in (1, 3, 9):
        chosen = [(user(PROMPTS[i % len(PROMPTS)]), f"answer {i}", True) for i in range(count)]
        cfg = dataclasses.replace(FAST, ppo_epochs=2, kl_stop=None, chosen_loss_coef=1.0)
        trainer = PPOTrainer(policy, tiny_loaded.tokenizer, random_reward, cfg, chosen=chosen)
        seen: list[int] = []
        score = trainer._chosen_loss

        def counted(rows, tokens, score=score, seen=seen):
            seen.extend(rows.tolist())
            return score(rows, tokens)

        trainer._chosen_loss = counted
        trainer.train(prompts, steps=1)
        if count <= cfg.batch_size:
            assert sorted(seen) == sorted(list(range(count)) * cfg.ppo_epochs), (count, seen)
        else:  # more than the rollouts: a random batch_size of them an epoch, none twice
            epochs = [seen[e * cfg.batch_size : (e + 1) * cfg.batch_size] for e in range(cfg.ppo_epochs)]
            assert len(seen) == cfg.batch_size * cfg.ppo_epochs and all(len(set(e)) == len(e) for e in epochs), seen

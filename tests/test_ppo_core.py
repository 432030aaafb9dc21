"""Hand-computed checks of the PPO math in rlhf_demo.ppo.core."""

import math

import pytest
import torch

from rlhf_demo.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    PPOConfig,
    apply_missing_eos_penalty,
    entropy_from_logits,
    gae,
    kl_controller,
    kl_penalized_rewards,
    kl_to_reference,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    policy_loss,
    rloo_advantages,
    value_loss,
    whiten,
)

# Real tokens {1, 2, 4}; row 0 has 2 tokens, row 1 a single token; padding holds junk.
X = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 99.0, -99.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
MEAN = 7 / 3  # (1 + 2 + 4) / 3
SQ_DEV = (1 - MEAN) ** 2 + (2 - MEAN) ** 2 + (4 - MEAN) ** 2  # = 14 / 3


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a).double(), torch.as_tensor(b).double(), atol=tol)


# ── masked statistics ────────────────────────────────────────────────────────────────


def test_masked_mean_all_and_per_row_ignores_padding():
    assert close(masked_mean(X, MASK), MEAN)
    assert close(masked_mean(X, MASK.bool(), dim=1), [1.5, 4.0])


def test_masked_mean_empty_row_is_zero():
    out = masked_mean(X, torch.tensor([[1, 1, 0], [0, 0, 0]]), dim=1)
    assert close(out, [1.5, 0.0])


def test_masked_var_unbiased_and_biased():
    assert close(masked_var(X, MASK), SQ_DEV / 2)  # 7/3
    assert close(masked_var(X, MASK, unbiased=False), SQ_DEV / 3)  # 14/9


def test_masked_var_single_element_is_zero_not_nan():
    single = torch.tensor([[3.0, 0.0]])
    m = torch.tensor([[1.0, 0.0]])
    assert masked_var(single, m).item() == 0.0
    assert masked_var(single, m, unbiased=False).item() == 0.0


def test_whiten_matches_hand_values_and_zeroes_padding():
    std = math.sqrt(SQ_DEV / 2 + 1e-8)
    expected = [[(1 - MEAN) / std, (2 - MEAN) / std, 0.0], [(4 - MEAN) / std, 0.0, 0.0]]
    assert close(whiten(X, MASK), expected)
    kept = [
        [(1 - MEAN) / std + MEAN, (2 - MEAN) / std + MEAN, 0.0],
        [(4 - MEAN) / std + MEAN, 0, 0],
    ]
    assert close(whiten(X, MASK, shift_mean=False), kept)


def test_whiten_single_token_is_finite():
    out = whiten(torch.tensor([[5.0, 7.0]]), torch.tensor([[1.0, 0.0]]))
    assert torch.isfinite(out).all() and out.abs().max() == 0


# ── rewards ──────────────────────────────────────────────────────────────────────────


def test_kl_penalized_rewards_hand_case():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -5.0], [-1.0, -2.0, -2.0], [-2.0, -1.0, -0.5]])
    # lengths 2, 1 (single token), 3 (full row)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    scores = torch.tensor([2.0, -1.0, 0.5])
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    assert close(kl, [[0.5, -1.0, 0.0], [0.5, 0.0, 0.0], [1.0, 0.0, -0.5]])
    assert close(
        rewards,
        [
            [-0.05, 0.1 + 2.0, 0.0],  # score at index 1, the last real token
            [-0.05 - 1.0, 0.0, 0.0],  # single-token response: penalty + score together
            [-0.1, 0.0, 0.05 + 0.5],
        ],
    )


def test_last_token_index_and_empty_row_gets_no_score():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 0, -1]
    rewards, _ = kl_penalized_rewards(torch.tensor([1.0, 1.0, 1.0]), torch.zeros(3, 3), torch.zeros(3, 3), mask, 0.1)
    assert close(rewards, [[0, 1, 0], [1, 0, 0], [0, 0, 0]])


def test_missing_eos_penalty():
    scores = torch.tensor([1.0, 1.0])
    has_eos = torch.tensor([True, False])
    assert close(apply_missing_eos_penalty(scores, has_eos, 2.0), [1.0, -1.0])
    assert apply_missing_eos_penalty(scores, has_eos, None) is scores


# ── GAE ──────────────────────────────────────────────────────────────────────────────


def naive_gae(values, rewards, lengths, gamma, lam):
    """Per-row python loop over the real tokens only."""
    B, T = len(values), len(values[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        L, last = lengths[b], 0.0
        for t in reversed(range(L)):
            next_v = values[b][t + 1] if t + 1 < L else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
    ret = [[adv[b][t] + (values[b][t] if t < lengths[b] else 0.0) for t in range(T)] for b in range(B)]
    return adv, ret


def test_gae_hand_case():
    # t=1: delta = 3 + 0 - 2 = 1, A1 = 1; t=0: delta = 0 + 2 - 1 = 1, A0 = 1 + 0.5 * 1
    adv, ret = gae(
        torch.tensor([[1.0, 2.0]]),
        torch.tensor([[0.0, 3.0]]),
        torch.ones(1, 2),
        1.0,
        0.5,
    )
    assert close(adv, [[1.5, 1.0]]) and close(ret, [[2.5, 3.0]])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_naive_loop_with_padding(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [4, 1, 3]
    mask = torch.tensor([[1.0] * n + [0.0] * (4 - n) for n in lengths])
    values = torch.randn(3, 4, generator=g)
    rewards = torch.randn(3, 4, generator=g)
    expected_adv, expected_ret = naive_gae(values.tolist(), rewards.tolist(), lengths, gamma, lam)
    # junk in padding must change nothing
    junk_values = torch.where(mask.bool(), values, torch.full_like(values, 50.0))
    junk_rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, -7.0))
    adv, ret = gae(junk_values, junk_rewards, mask, gamma, lam)
    assert close(adv, expected_adv, 1e-5) and close(ret, expected_ret, 1e-5)
    assert not adv.requires_grad


# ── losses ───────────────────────────────────────────────────────────────────────────


def test_policy_loss_no_clip_when_ratio_is_one():
    lp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -3.0, 100.0]])
    loss, stats = policy_loss(lp, lp.detach(), adv, torch.tensor([[1, 1, 0]]))
    assert close(loss, -(1.0 - 3.0) / 2)
    assert stats == {"approx_kl": 0.0, "clipfrac": 0.0, "ratio_mean": 1.0}


def test_policy_loss_clipping_active_and_inactive():
    old = torch.zeros(1, 5)
    # the last token is padding
    lp = torch.tensor([[0.5, -0.5, 0.5, -0.5, 9.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    hi, lo = math.exp(0.5), math.exp(-0.5)
    # per token max(-A*r, -A*clip(r)): clipped, unclipped, unclipped, clipped
    expected = (max(-hi, -1.2) + max(-lo, -0.8) + max(hi, 1.2) + max(lo, 0.8)) / 4
    loss, stats = policy_loss(lp, old, adv, mask, clip=0.2)
    assert close(loss, expected)
    assert stats["clipfrac"] == pytest.approx(0.5)
    assert stats["approx_kl"] == pytest.approx(0.5 * 0.25)
    assert stats["ratio_mean"] == pytest.approx((2 * hi + 2 * lo) / 4)
    loss.backward()
    # clipped tokens and padding get no gradient; others d(-A*r)/dlogp / 4 = -A*r / 4
    assert close(lp.grad, [[0.0, -lo / 4, hi / 4, 0.0, 0.0]])


def test_value_loss_clipping():
    old = torch.zeros(1, 5)
    v = torch.tensor([[0.5, 0.1, 0.5, -0.5, 3.0]], requires_grad=True)
    ret = torch.tensor([[1.0, 1.0, 0.3, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    # (v-R)^2 vs (clip(v, -0.2, 0.2)-R)^2: 0.25|0.64, 0.81|0.81, 0.04|0.01, 0.25|0.64
    loss, stats = value_loss(v, old, ret, mask, clip=0.2)
    assert close(loss, 0.5 * (0.64 + 0.81 + 0.04 + 0.64) / 4)
    assert stats["vf_clipfrac"] == pytest.approx(0.5)
    loss.backward()
    # clipped tokens (0, 3) get no gradient; d 0.5*(v-R)^2/4 = (v-R)/4
    assert close(v.grad, [[0.0, (0.1 - 1.0) / 4, (0.5 - 0.3) / 4, 0.0, 0.0]])


# ── logits ───────────────────────────────────────────────────────────────────────────


def test_chunked_logprobs_equal_log_softmax_gather_with_grads():
    g = torch.Generator().manual_seed(0)
    full = torch.randn(2, 7, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    weights = torch.randn(2, 5, generator=g)

    a = full.clone().requires_grad_(True)
    ref = torch.log_softmax(a[:, 1:6], -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (ref * weights).sum().backward()

    b = full.clone().requires_grad_(True)
    # a non-contiguous slice, cut into uneven chunks of 3 rows
    out = logprobs_from_logits(b[:, 1:6], labels, chunk_size=3)
    (out * weights).sum().backward()

    assert out.dtype == torch.float32 and out.shape == (2, 5)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(b.grad, a.grad, atol=1e-6)


def test_chunked_logprobs_gradcheck_and_bf16():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    assert torch.autograd.gradcheck(lambda z: logprobs_from_logits(z, labels, chunk_size=2), (logits,))

    low = logits.detach().to(torch.bfloat16)
    out = logprobs_from_logits(low, labels)
    ref = torch.log_softmax(low.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-6)


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]]])
    p = torch.softmax(logits[0, 2], -1).tolist()
    h = -sum(q * math.log(q) for q in p)
    assert close(entropy_from_logits(logits, chunk_size=2), [[math.log(4), 0.0, h]], 1e-5)


# ── KL controllers, config ───────────────────────────────────────────────────────────


def test_adaptive_kl_moves_the_right_way_and_is_bounded():
    ctl = AdaptiveKLController(0.05, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=8)  # err = clip(1.0) = 0.2
    assert ctl.value == pytest.approx(0.05 * (1 + 0.2 * 8 / 10000))
    ctl = AdaptiveKLController(0.05, 6.0, 10000)
    ctl.update(6.6, 100)  # err = 0.1, inside the clip
    assert ctl.value == pytest.approx(0.05 * 1.001)
    ctl = AdaptiveKLController(0.05, 6.0, 10000)
    ctl.update(0.0, 100)  # err = clip(-1.0) = -0.2: too close to ref -> smaller penalty
    assert ctl.value == pytest.approx(0.05 * (1 - 0.2 * 100 / 10000))
    ctl = AdaptiveKLController(0.05, 6.0, 10000)
    ctl.update(1e9, 10000)  # huge KL: at most x1.2 per update
    assert ctl.value == pytest.approx(0.05 * 1.2)


def test_fixed_kl_and_config():
    assert FixedKLController(0.05).update(100.0, 8) == 0.05
    cfg = PPOConfig()
    assert (cfg.advantage, cfg.ppo_epochs, cfg.gamma, cfg.lam) == ("rloo", 2, 1.0, 0.95)
    assert (cfg.cliprange, cfg.cliprange_value, cfg.vf_coef) == (0.2, 0.2, 0.1)
    assert isinstance(kl_controller(cfg), AdaptiveKLController)
    assert isinstance(kl_controller(PPOConfig(adap_kl_ctrl=False)), FixedKLController)
    with pytest.raises(ValueError):
        PPOConfig(batch_size=8, mini_batch_size=3)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        PPOConfig(batch_size=8, mini_batch_size=4, samples_per_prompt=3)
    with pytest.raises(ValueError, match="leave-one-out"):
        PPOConfig(batch_size=8, mini_batch_size=4, samples_per_prompt=1)
    with pytest.raises(ValueError, match="advantage"):
        PPOConfig(advantage="grpo")


def test_rloo_advantage_is_the_return_minus_the_mean_of_the_others():
    returns = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    adv = rloo_advantages(returns, 3)
    # prompt 1: 1 - (2+3)/2 = -1.5, 2 - 2 = 0, 3 - 1.5 = 1.5; prompt 2: all equal -> 0
    assert torch.allclose(adv, torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))
    assert torch.allclose(adv.reshape(2, 3).sum(1), torch.zeros(2))  # zero-sum per prompt
    with pytest.raises(ValueError):
        rloo_advantages(returns, 4)
    with pytest.raises(ValueError):
        rloo_advantages(returns, 1)


def test_kl_to_reference_is_the_exact_kl_and_its_gradient_pulls_toward_the_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    ref = torch.randn(3, 5, 11)
    kl = kl_to_reference(logits, ref)
    p, q = torch.softmax(logits, -1), torch.softmax(ref, -1)
    assert kl.shape == (3, 5)
    assert torch.allclose(kl, (p * (p.log() - q.log())).sum(-1), atol=1e-6)
    assert (kl > 0).all() and kl_to_reference(ref, ref).abs().max() < 1e-6
    assert kl_to_reference(ref.double(), ref.double()).dtype == torch.float64
    kl.sum().backward()
    with torch.no_grad():
        assert (kl_to_reference(logits - 0.1 * logits.grad, ref) < kl).all()
    # a shift of all logits by a constant is the same distribution
    assert torch.allclose(kl_to_reference(ref + 3.0, ref), torch.zeros(3, 5), atol=1e-5)

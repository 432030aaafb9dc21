"""PPO math for RLHF as pure tensor functions.

Follows "The N Implementation Details of RLHF with PPO" (Huang et al. 2023), Ziegler et
al. 2019 and the conventions of TRL <= 0.11 ``PPOTrainer``. Each implementation detail
is a named line with a comment ``# detail: ...`` so a reader can find it by name.

Shapes: ``B`` = batch (responses), ``T`` = response length (padded), ``V`` = vocabulary.
``mask`` is a float or bool tensor (B, T), 1 for real response tokens and 0 for padding.
Responses may have different lengths (right padding) and may be a single token.
Nothing here touches models, tokenizers or storage.
"""

from __future__ import annotations

import torch

from rlhf_demo.config import PPOConfig

WHITEN_EPS = 1e-8  # TRL's epsilon inside sqrt(var + eps)
DEFAULT_CHUNK_ROWS = 512  # rows of (V,) logits per chunk: 512 x 49k x 4 B ~ 100 MB


# ── masked statistics ────────────────────────────────────────────────────────────────


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1.

    x, mask: same shape, e.g. (B, T). ``dim=None`` gives a scalar, ``dim=1`` (B,).
    Padding is selected away (not multiplied), so NaN/inf in padding is harmless.
    A row (or the whole tensor) with no real position has mean 0, not NaN.
    """
    m = mask.bool()
    total = torch.where(m, x, torch.zeros_like(x))
    count = m.to(x.dtype)
    if dim is None:
        return total.sum() / count.sum().clamp(min=1)
    return total.sum(dim) / count.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance (scalar) of ``x`` over all positions where ``mask`` is 1 (as TRL).

    ``unbiased`` applies Bessel's correction n / (n - 1). With n <= 1 real element the
    correction is undefined; we then return the biased variance, which is 0, so that a
    batch holding a single one-token response gives 0 instead of NaN/inf.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().sum().to(var.dtype)
        bessel = torch.where(n > 1, n / (n - 1).clamp(min=1), torch.ones_like(n))
        var = var * bessel
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` (B, T) to zero mean / unit variance over the masked positions.

    TRL semantics: ``(x - mean) / sqrt(var + 1e-8)`` with masked mean and (unbiased)
    variance; with ``shift_mean=False`` the mean is added back (only the scale changes;
    used for reward whitening). Padding positions of the result are set to 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


# ── rewards, advantages ──────────────────────────────────────────────────────────────


def apply_missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Subtract ``penalty`` from the score (B,) of each response whose ``has_eos``
    (B,) is False (a truncated answer). ``penalty=None`` returns ``scores`` as is."""
    if penalty is None:
        return scores
    # detail: penalise responses that did not finish with EOS (Huang et al. 2023; TRL
    # ``missing_eos_penalty``) so the policy does not learn to ramble until truncation.
    return scores - penalty * (~has_eos.bool()).to(scores.dtype)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) of the last real token in each row of ``mask`` (B, T); -1 if none."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of Ziegler et al.: ``-kl_coef * kl`` everywhere, plus the
    reward-model score at the last real token.

    scores: (B,) one scalar per response. logprobs, ref_logprobs: (B, T)
    log-probabilities of the sampled tokens under the policy and the reference.
    mask: (B, T). Returns ``(rewards, kl)``, both (B, T) and 0 where mask is 0.
    A row with no real token receives no score.
    """
    m = mask.bool()
    # detail: per-token KL estimate k1 = log pi(a|s) - log pi_ref(a|s) (sampled tokens).
    kl = torch.where(m, logprobs - ref_logprobs, torch.zeros_like(logprobs))
    # detail: KL penalty as a dense per-token reward, -beta * kl (Ziegler et al. 2019).
    rewards = -kl_coef * kl
    # detail: the scalar score is given only at the last real response token (index
    # taken from the mask, so right padding and different lengths work).
    last = last_token_index(mask)
    has_token = (last >= 0).to(rewards.dtype)
    score_at_end = torch.zeros_like(rewards).scatter_(
        1,
        last.clamp(min=0).unsqueeze(1),
        (scores.to(rewards.dtype) * has_token).unsqueeze(1),
    )
    rewards = rewards + score_at_end
    return rewards, kl


@torch.no_grad()
def gae(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, reverse in time (Schulman et al. 2016).

    values, rewards, mask: (B, T). Returns ``(advantages, returns)``, both (B, T),
    with ``returns = advantages + values`` and 0 at padding. Values and rewards at
    padding are treated as 0, so the value after the last real token is 0 (the episode
    ends there) and padding contributes nothing. Outputs carry no gradient (targets).
    Advantages are NOT whitened here: the caller whitens them (a named detail).
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    T = values.shape[1]
    last_gae = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * m[:, t]
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages, returns


def rloo_advantages(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024).

    returns: (B,) one KL-penalised return per answer, in groups of ``group_size``
    consecutive answers to the same prompt. Each answer's baseline is the mean return of
    the *other* answers in its group, so the advantage is unbiased and needs no value head:
    with a handful of samples it has far less variance than GAE on a cold value head.
    """
    if group_size < 2 or returns.shape[0] % group_size:
        raise ValueError(f"need groups of >= 2 answers, got {returns.shape[0]} answers in groups of {group_size}")
    grouped = returns.reshape(-1, group_size)
    # detail: leave-one-out baseline, mean of the other k - 1 returns of the same prompt.
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


# ── losses ───────────────────────────────────────────────────────────────────────────


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate objective of PPO, as a loss to minimise (scalar).

    logprobs: (B, T) under the current policy (with grad); old_logprobs, advantages:
    (B, T) from the rollout. Stats (python floats): ``approx_kl`` =
    0.5 * mean((logp - old)^2) (TRL's estimator), ``clipfrac`` (fraction of tokens
    where the clip is active), ``ratio_mean``.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    # detail: clipped surrogate objective, ratio clipped to [1 - clip, 1 + clip].
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    # detail: token-level masked mean over real response tokens only.
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        # detail: approx-KL 0.5 * E[(log ratio)^2], to monitor and early-stop updates.
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
        clipfrac = masked_mean((pg_losses_clipped > pg_losses).to(ratio.dtype), mask)
        ratio_mean = masked_mean(ratio, mask)
        approx_kl_f, clipfrac_f, ratio_mean_f = torch.stack([approx_kl, clipfrac, ratio_mean]).tolist()
    return loss, {
        "approx_kl": approx_kl_f,
        "clipfrac": clipfrac_f,
        "ratio_mean": ratio_mean_f,
    }


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss ``0.5 * mean(max((v - R)^2, (v_clipped - R)^2))`` (scalar).

    values: (B, T) current predictions (with grad); old_values, returns: (B, T) from the
    rollout / GAE. ``v_clipped = old + clamp(v - old, -clip, clip)``. Stats (python
    float): ``vf_clipfrac``, the fraction of tokens where the clipped term is larger.
    """
    # detail: value function loss clipping around the rollout values (PPO2, TRL).
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    vf_losses = (values - returns) ** 2
    vf_losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((vf_losses_clipped > vf_losses).to(values.dtype), mask)
    return loss, {"vf_clipfrac": vf_clipfrac.item()}


# ── logits → log-probabilities, entropy (chunked) ────────────────────────────────────


def _row_chunks(batch: int, length: int, chunk_rows: int):
    """Yield (b, t0, t1): slices ``logits[b, t0:t1]`` of at most ``chunk_rows`` rows.

    Slicing per batch row keeps every chunk a view (no copy) even when ``logits`` is a
    non-contiguous slice like ``logits[:, prompt_len - 1 : -1]``.
    """
    step = max(1, min(chunk_rows, length))
    for b in range(batch):
        for t0 in range(0, length, step):
            yield b, t0, min(t0 + step, length)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16/fp16 -> fp32, fp64 stays


class _ChunkedLogprobs(torch.autograd.Function):
    """log p(label) = logit[label] - logsumexp(logits), chunk by chunk in fp32.

    Saves only the original logits for backward and recomputes the softmax per chunk, so
    neither pass keeps a full fp32 (B, T, V) copy alive: only one chunk at a time.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int):
        B, T, _ = logits.shape
        dtype = _compute_dtype(logits.dtype)
        out = torch.empty(B, T, dtype=dtype, device=logits.device)
        for b, t0, t1 in _row_chunks(B, T, chunk_rows):
            chunk = logits[b, t0:t1].to(dtype)
            picked = chunk.gather(-1, labels[b, t0:t1].unsqueeze(-1)).squeeze(-1)
            out[b, t0:t1] = picked - torch.logsumexp(chunk, dim=-1)
        ctx.save_for_backward(logits, labels)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, labels = ctx.saved_tensors
        B, T, _ = logits.shape
        dtype = _compute_dtype(logits.dtype)
        grad = torch.empty_like(logits)
        for b, t0, t1 in _row_chunks(B, T, ctx.chunk_rows):
            g = grad_out[b, t0:t1].to(dtype).unsqueeze(-1)
            # d/dz (z_y - logsumexp z) = onehot(y) - softmax(z)
            chunk_grad = -torch.softmax(logits[b, t0:t1].to(dtype), dim=-1) * g
            chunk_grad.scatter_add_(-1, labels[b, t0:t1].unsqueeze(-1), g)
            grad[b, t0:t1] = chunk_grad.to(grad.dtype)
        return grad, None, None


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Log-probability of ``labels`` under ``softmax(logits)``.

    logits: (B, T, V) any float dtype, already aligned so that ``logits[:, t]``
    predicts ``labels[:, t]``; labels: (B, T) int64. Returns (B, T) in fp32 (fp64 for
    fp64 input). Computed in chunks of ``chunk_size`` rows as
    ``logit[label] - logsumexp(logits)`` so a 49k vocabulary at 8 x 256 tokens never
    materialises a full fp32 log-softmax; the backward pass recomputes per chunk.
    Differentiable with respect to ``logits``.
    """
    return _ChunkedLogprobs.apply(logits, labels.long(), chunk_size)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Entropy (B, T) of ``softmax(logits)`` for logits (B, T, V), in fp32, chunked.

    H = logsumexp(z) - sum(softmax(z) * z). Meant for monitoring (call under no_grad):
    with grad enabled autograd keeps each chunk's intermediates.
    """
    B, T, _ = logits.shape
    pieces = []
    for b, t0, t1 in _row_chunks(B, T, chunk_size):
        z = logits[b, t0:t1].to(_compute_dtype(logits.dtype))
        pieces.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1))
    if not pieces:
        return logits.new_zeros(B, T, dtype=_compute_dtype(logits.dtype))
    return torch.cat(pieces).view(B, T)


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi || pi_ref) over the vocabulary at each position, in fp32.

    logits, ref_logits: (..., V) of the policy and the reference at the same states (already
    divided by the sampling temperature). Returns (...). Differentiable with respect to
    ``logits``. Unlike the sampled-token estimate ``log pi(a) - log pi_ref(a)``, it has no
    sampling noise at a visited state, so as a loss term it pulls every direction the
    policy drifted in back toward the reference (docs/learning.md, the KL as a loss term).
    """
    dtype = _compute_dtype(logits.dtype)
    logp = torch.log_softmax(logits.to(dtype), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.to(dtype), dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(dim=-1)


# ── KL coefficient controllers ───────────────────────────────────────────────────────


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (TRL ``AdaptiveKLController``).

    ``update(current_kl, n_steps)``: ``err = clip(current_kl / target - 1, -0.2, 0.2)``,
    ``value *= 1 + err * n_steps / horizon``. ``current_kl`` is the mean per-response
    KL (sum over tokens), ``n_steps`` the number of responses in the batch. The
    coefficient grows when the policy drifts beyond ``target`` and shrinks when it stays
    closer, by at most a factor ``1 +- 0.2 * n_steps / horizon`` per update.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        # detail: adaptive KL control, proportional error clipped to +-0.2 (Ziegler).
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult
        return self.value


class FixedKLController:
    """Constant KL coefficient; ``update`` does nothing (same interface as adaptive)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


def kl_controller(config: PPOConfig) -> AdaptiveKLController | FixedKLController:
    """The KL controller that ``config`` asks for."""
    if config.adap_kl_ctrl:
        return AdaptiveKLController(config.init_kl_coef, config.target_kl, config.horizon)
    return FixedKLController(config.init_kl_coef)

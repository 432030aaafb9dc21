"""Reward-model losses, metrics, score normalisation and the held-out split.

Pure functions on tensors and strings: Bradley-Terry on A/B pairs, logistic loss on
thumbs, their accuracies, the normaliser that hands PPO standardised scores, and a
hash-based train/held-out split that never changes as the data grows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

# ── losses ───────────────────────────────────────────────────────────────────────────


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, center_coef: float | None = None) -> torch.Tensor:
    """Pairwise loss ``mean(-log sigmoid(r_chosen - r_rejected))`` (scalar).

    r_chosen, r_rejected: (N,) rewards of the preferred / other response of each pair.
    ``center_coef`` adds TRL's ``center_rewards_coefficient`` term
    ``center_coef * mean((r_chosen + r_rejected)^2)``, which keeps rewards centred on 0
    (the BT loss alone only sees differences).
    """
    loss = -F.logsigmoid(r_chosen - r_rejected).mean()
    if center_coef:
        loss = loss + center_coef * torch.mean((r_chosen + r_rejected) ** 2)
    return loss


def _signs(labels: torch.Tensor) -> torch.Tensor:
    """+1 where label > 0 (up: 1, True), -1 elsewhere (down: -1, 0, False)."""
    return torch.where(labels > 0, 1.0, -1.0)


def thumb_loss(rewards: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Logistic loss on thumbs: weighted mean of ``-log sigmoid(y * r)`` (scalar).

    rewards: (N,). labels: (N,) with y = +1 for label > 0 and -1 otherwise, so +-1, 0/1
    and bool labels all work. weights: optional (N,) non-negative. r = 0 is neutral
    (loss log 2 either way), positive rewards mean "thumbs up".
    """
    y = _signs(labels).to(rewards.dtype)
    losses = -F.logsigmoid(y * rewards)
    if weights is None:
        return losses.mean()
    w = weights.to(losses.dtype)
    return (w * losses).sum() / w.sum().clamp(min=torch.finfo(w.dtype).tiny)


# ── metrics ──────────────────────────────────────────────────────────────────────────


def _agreement(x: torch.Tensor) -> float:
    """Mean of 1 where x > 0, 1/2 where x == 0, 0 where x < 0; NaN for empty input."""
    if x.numel() == 0:
        return float("nan")
    return ((x > 0).double() + 0.5 * (x == 0).double()).mean().item()


@torch.no_grad()
def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Fraction of pairs with ``r_chosen > r_rejected``. Ties count 1/2, so a constant
    reward model scores 0.5 (chance), not 1.0 or 0.0. NaN for no pairs."""
    return _agreement(r_chosen - r_rejected)


@torch.no_grad()
def mean_margin(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Mean of ``r_chosen - r_rejected``. NaN for no pairs."""
    if r_chosen.numel() == 0:
        return float("nan")
    return (r_chosen - r_rejected).double().mean().item()


# ── score normalisation for PPO ──────────────────────────────────────────────────────


def fit_normalizer(scores: torch.Tensor | Sequence[float]) -> tuple[float, float]:
    """``(mean, std)`` of reward-model scores over a reference batch (e.g. the held-out
    responses), stored with the reward model so PPO sees scores around N(0, 1).

    Population std. With fewer than 2 scores or a std below 1e-6 the std is 1.0 (shift
    only), so normalising never divides by ~0.
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if s.numel() == 0:
        return 0.0, 1.0
    mean = s.mean().item()
    std = s.std(correction=0).item() if s.numel() > 1 else 0.0
    return mean, (std if std >= 1e-6 else 1.0)


def normalize_scores(scores: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(scores - mean) / std`` with the pair from :func:`fit_normalizer`."""
    return (scores - mean) / std


# ── held-out split ───────────────────────────────────────────────────────────────────


def example_key(prompt_messages: Any, *texts: str) -> str:
    """Stable hex key (sha256) of a prompt (messages list or string) and response texts.

    The texts are sorted, so the same pair voted either way (A over B or B over A) gets
    the same key and lands on the same side of :func:`holdout_split`.
    """
    payload = json.dumps(
        [prompt_messages, sorted(texts)],
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def holdout_split(key: str, fraction: float = 0.15) -> bool:
    """True if the example with this key is held out for evaluation.

    Decided by the sha256 of the key alone (first 8 bytes as a number in [0, 1)), so an
    example never changes side as the data grows, across processes and Python versions.
    """
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction

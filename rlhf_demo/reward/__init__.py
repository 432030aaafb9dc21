"""Reward model: Bradley-Terry on A/B pairs, logistic on thumbs, held-out evaluation.

Losses, metrics, score normalisation and the held-out split live in
:mod:`rlhf_demo.reward.losses`; the adapter + head model and its training loop in
:mod:`rlhf_demo.reward.trainer`.
"""

from rlhf_demo.reward.losses import (
    bradley_terry_loss,
    example_key,
    fit_normalizer,
    holdout_split,
    mean_margin,
    normalize_scores,
    pairwise_accuracy,
    thumb_accuracy,
    thumb_loss,
)
from rlhf_demo.reward.trainer import (
    RewardConfig,
    RewardModel,
    build_examples,
    evaluate,
    split_holdout,
    train_reward_model,
)

__all__ = [
    "RewardConfig",
    "RewardModel",
    "build_examples",
    "evaluate",
    "split_holdout",
    "train_reward_model",
    "bradley_terry_loss",
    "example_key",
    "fit_normalizer",
    "holdout_split",
    "mean_margin",
    "normalize_scores",
    "pairwise_accuracy",
    "thumb_accuracy",
    "thumb_loss",
]

"""Reward model: a linear probe on the frozen base, Bradley-Terry on A/B pairs, logistic on
thumbs, cross-validated agreement.

One module per job: :mod:`~rlhf_demo.reward.data` turns votes into examples, :mod:`~rlhf_demo.reward.model` is the probe on the frozen base and its
scoring, :mod:`~rlhf_demo.reward.trainer` fits and measures it; losses, metrics, score
normalisation and the hash split live in :mod:`~rlhf_demo.reward.losses`.
"""

from rlhf_demo.reward.data import build_examples
from rlhf_demo.reward.losses import (
    bradley_terry_loss,
    example_key,
    fit_normalizer,
    holdout_split,
    mean_margin,
    normalize_scores,
    pairwise_accuracy,
    thumb_loss,
)
from rlhf_demo.reward.model import RewardModel, chat_text
from rlhf_demo.reward.trainer import RewardConfig, RewardMetrics, train_reward_model

__all__ = [
    "RewardConfig",
    "RewardMetrics",
    "RewardModel",
    "build_examples",
    "chat_text",
    "train_reward_model",
    "bradley_terry_loss",
    "example_key",
    "fit_normalizer",
    "holdout_split",
    "mean_margin",
    "normalize_scores",
    "pairwise_accuracy",
    "thumb_loss",
]

"""Reward model: Bradley-Terry on A/B pairs, logistic on thumbs, held-out evaluation.

Losses, metrics, score normalisation and the held-out split live in
:mod:`rlhf_demo.reward.losses`.
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

__all__ = [
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

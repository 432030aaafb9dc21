"""PPO: rollouts, KL-penalised rewards, GAE, clipped losses, adaptive KL.

The math lives in :mod:`rlhf_demo.ppo.core` as pure tensor functions.
"""

from rlhf_demo.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    PPOConfig,
    apply_missing_eos_penalty,
    entropy_from_logits,
    gae,
    kl_controller,
    kl_penalized_rewards,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    policy_loss,
    value_loss,
    whiten,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "PPOConfig",
    "apply_missing_eos_penalty",
    "entropy_from_logits",
    "gae",
    "kl_controller",
    "kl_penalized_rewards",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "policy_loss",
    "value_loss",
    "whiten",
]

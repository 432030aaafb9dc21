"""PPO: rollouts, KL-penalised rewards, GAE/RLOO, clipped losses, the exact KL loss, adaptive KL.

The math lives in :mod:`rlhf_demo.ppo.core` as pure tensor functions; the rollout /
update loop on the shared base in :mod:`rlhf_demo.ppo.trainer`, sampling and the
forward pass over answers in :mod:`rlhf_demo.ppo.rollouts`.
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
from rlhf_demo.ppo.rollouts import ResponseForward, response_forward, sample, sample_and_score, truncate_at_eos
from rlhf_demo.ppo.trainer import PPOTrainer, Rollout

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "PPOConfig",
    "PPOTrainer",
    "ResponseForward",
    "Rollout",
    "apply_missing_eos_penalty",
    "entropy_from_logits",
    "gae",
    "kl_controller",
    "kl_penalized_rewards",
    "kl_to_reference",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "policy_loss",
    "response_forward",
    "rloo_advantages",
    "sample",
    "sample_and_score",
    "truncate_at_eos",
    "value_loss",
    "whiten",
]

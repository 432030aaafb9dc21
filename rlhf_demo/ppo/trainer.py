"""PPO trainer: rollouts of a LoRA policy on the shared base, then clipped PPO updates.

One base model holds three roles (no second copy of any weight, no deepcopy):

- policy: the PEFT adapter ``policy_adapter`` (trained);
- reference: the same base with every adapter off (``use_base``, never trained);
- value function: a :class:`ScalarHead` on the policy's last hidden states (trained).

``step`` reads top to bottom like CleanRL's ``ppo.py``; every implementation detail of
"The N Implementation Details of RLHF with PPO" (Huang et al. 2023) that lives here is a
line with a ``# detail:`` comment. The math itself is in :mod:`rlhf_demo.ppo.core`, sampling
and the forward pass over answers in :mod:`rlhf_demo.ppo.rollouts`.

Shapes: ``B`` responses, ``P`` prompt length (left padded), ``T`` response length
(right padded after EOS), ``H`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_demo.modeling.adapters import (
    adapter_parameters,
    adapter_state,
    kept_adapter_state,
    restore_adapter_state,
    save_adapter,
    use_adapter,
    use_base,
)
from rlhf_demo.modeling.heads import ScalarHead, hidden_size
from rlhf_demo.modeling.quantized import keep_4bit_differentiable
from rlhf_demo.ppo.core import (
    PPOConfig,
    apply_missing_eos_penalty,
    gae,
    kl_controller,
    kl_penalized_rewards,
    masked_mean,
    policy_loss,
    rloo_advantages,
    value_loss,
    whiten,
)
from rlhf_demo.ppo.rollouts import (
    Messages,
    RewardFn,
    Sampled,
    causal_lm,
    encode_answers,
    response_forward,
    sample,
    sample_and_score,
    truncate_at_eos,
)

# sample, sample_and_score and truncate_at_eos are re-exported: the worker and benches import them from here.
__all__ = ["PPOTrainer", "Rollout", "TrainResult", "sample", "sample_and_score", "truncate_at_eos"]


ADAM_EPS = 1e-5  # CleanRL / OpenAI baselines; TRL keeps torch's 1e-8


@dataclass
class Rollout:
    """One batch of sampled answers with everything PPO needs, all on the model's device.

    ``completions`` are the decoded answers (EOS and special tokens dropped) that the
    reward function scored; every other field is a tensor.
    """

    query_ids: torch.Tensor  # (B, P) chat-templated prompts, left padded
    query_mask: torch.Tensor  # (B, P) 1 = real token, 0 = left padding
    response_ids: torch.Tensor  # (B, T) sampled tokens up to and including EOS, then pad
    response_mask: torch.Tensor  # (B, T) bool, True for real response tokens (EOS too)
    has_eos: torch.Tensor  # (B,) bool, False when the answer hit max_new_tokens
    logprobs: torch.Tensor  # (B, T) policy log-probs of the sampled tokens, 0 at padding
    ref_logprobs: torch.Tensor  # (B, T) the same under the reference (adapters off)
    ref_hidden: torch.Tensor | None  # (B, T, H) the reference's last hidden states (for the KL loss)
    values: torch.Tensor  # (B, T) value-head estimates, 0 at padding
    entropy: torch.Tensor  # (B, T) policy entropy at each response position, 0 at padding
    raw_scores: torch.Tensor  # (B,) reward_fn output
    scores: torch.Tensor  # (B,) raw_scores after the missing-EOS penalty
    completions: list[str]


@dataclass
class TrainResult:
    """What one ``PPOTrainer.train`` call did: per-step stats, how many updates the policy
    keeps, and why it stopped early (None: it ran every step)."""

    history: list[dict[str, float]]
    kept_updates: int
    stopped: str | None = None

    @property
    def last(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


# ── the trainer ──────────────────────────────────────────────────────────────────────


class PPOTrainer:
    """PPO on the LoRA adapter ``policy_adapter`` of the PEFT model ``model``.

    ``reward_fn(prompts, completions, finished) -> (B,)`` scores the decoded answers (already
    normalised by the caller). Only the policy's LoRA parameters (and, with GAE, the
    value head) are optimised (AdamW); the base weights and other adapters are untouched.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        reward_fn: RewardFn,
        config: PPOConfig,
        policy_adapter: str = "policy",
        value_head: ScalarHead | None = None,
        chosen: list[tuple[Messages, str, bool]] | None = None,
    ) -> None:
        """``chosen``: (prompt, answer, finished) the voters preferred, for the likelihood
        term ``config.chosen_loss_coef`` weighs (unused at 0)."""
        if policy_adapter not in getattr(model, "peft_config", {}):
            raise ValueError(f"model has no adapter named {policy_adapter!r}")
        lm_config = causal_lm(model).config
        for option in ("final_logit_softcapping", "logit_scale"):
            if getattr(lm_config, option, None) not in (None, 1.0):
                raise ValueError(f"{option} models are not supported (plain lm_head)")
        if config.temperature <= 0:
            raise ValueError("PPO samples: temperature must be > 0")
        self.model, self.tokenizer, self.reward_fn = model, tokenizer, reward_fn
        self.config, self.policy_adapter = config, policy_adapter
        self.device = model.get_input_embeddings().weight.device
        self.value_head: ScalarHead | None = None
        if config.advantage == "gae":
            if value_head is None:
                value_head = ScalarHead(hidden_size(model))
                # detail: value head zero-initialised (lm-human-preferences): V = 0 at the
                # start, so early advantages are the rewards, not a random head's noise.
                torch.nn.init.zeros_(value_head.linear.weight)
            self.value_head = value_head.to(self.device)
        self.policy_params = list(adapter_parameters(model, policy_adapter).values())
        self.trainable_params = self.policy_params + (list(self.value_head.parameters()) if self.value_head else [])
        # detail: AdamW over the policy LoRA (+ value head) only, eps 1e-5 (CleanRL), no
        # weight decay (decay would pull the LoRA delta, i.e. the policy, to the base).
        self.optimizer = torch.optim.AdamW(self.trainable_params, lr=config.learning_rate, eps=ADAM_EPS, weight_decay=0.0)
        self.kl_ctl = kl_controller(config)
        self.chosen: Sampled | None = None
        if chosen and config.chosen_loss_coef > 0:
            prompts, answers, finished = (list(column) for column in zip(*chosen, strict=True))
            self.chosen = encode_answers(model, tokenizer, prompts, answers, finished, config.max_new_tokens)

    @contextmanager
    def as_policy(self) -> Iterator[None]:
        """The block runs with the policy the active adapter and its LoRA weights the only
        trainable model parameters; the model's previous adapter state comes back after.
        Inside it, the reward function is called within :func:`kept_adapter_state` and the
        reference within :func:`use_base`, so neither can leave another adapter active."""
        # detail: dropout off for rollouts AND updates (Huang et al.; use_adapter sets
        # eval mode): log-probs of the rollout and the first update agree, ratio starts at 1.
        with use_adapter(self.model, self.policy_adapter, trainable=True):
            # NF4 on CPU: stop bitsandbytes' inference repacking, whose kernel has no backward.
            keep_4bit_differentiable(self.model)
            yield

    # ----- rollout --------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list[Messages]) -> Rollout:
        """Sample one answer per prompt, score it, and recompute log-probs (and values)."""
        with self.as_policy():
            return self._rollout(prompts)

    def _rollout(self, prompts: list[Messages]) -> Rollout:
        s = sample(self.model, self.tokenizer, prompts, self.config)
        with kept_adapter_state(self.model):
            scored = self.reward_fn(prompts, s.completions, s.has_eos.tolist())
        raw_scores = torch.as_tensor(scored, dtype=torch.float32).to(self.device).reshape(-1)
        if raw_scores.shape[0] != len(prompts):
            raise ValueError(f"reward_fn gave {raw_scores.shape[0]} scores for {len(prompts)} answers")
        # detail: missing-EOS penalty for answers truncated by max_new_tokens.
        scores = apply_missing_eos_penalty(raw_scores, s.has_eos, self.config.missing_eos_penalty)
        batch = (s.query_ids, s.query_mask, s.response_ids, s.response_mask)
        temperature = self.config.temperature
        logprobs, values, entropy, _, _ = response_forward(self.model, *batch, temperature, self.value_head, with_entropy=True)
        # detail: reference = the same base with adapters disabled (no model copy).
        with use_base(self.model):
            reference = response_forward(self.model, *batch, temperature, keep_hidden=self.config.kl_loss_coef > 0)
        assert entropy is not None
        return Rollout(
            query_ids=s.query_ids,
            query_mask=s.query_mask,
            response_ids=s.response_ids,
            response_mask=s.response_mask,
            has_eos=s.has_eos,
            logprobs=logprobs,
            ref_logprobs=reference.logprobs,
            ref_hidden=reference.hidden,
            values=values if values is not None else torch.zeros_like(logprobs),
            entropy=entropy,
            raw_scores=raw_scores,
            scores=scores,
            completions=s.completions,
        )

    # ----- one PPO iteration ----------------------------------------------------------
    def step(self, prompts: list[Messages], kl_stop: float | None = None) -> dict[str, float]:
        """Rollout (``samples_per_prompt`` answers per prompt), advantages, then
        ``ppo_epochs`` epochs of clipped updates. With ``kl_stop``, a rollout whose KL to
        the reference passes it ends the step before any update (stat ``kl_stop`` = 1)."""
        with self.as_policy():
            return self._step(prompts, kl_stop)

    def _step(self, prompts: list[Messages], kl_stop: float | None) -> dict[str, float]:
        started = time.perf_counter()
        cfg = self.config
        k = cfg.samples_per_prompt
        # detail: k answers per prompt, consecutive, so each prompt's group is one row block.
        r = self.rollout([p for p in prompts for _ in range(k)])
        rollout_s = time.perf_counter() - started
        mask = r.response_mask
        kl_coef = self.kl_ctl.value
        # detail: per-token KL penalty with the current coefficient; score at the end.
        rewards, kl = kl_penalized_rewards(r.scores, r.logprobs, r.ref_logprobs, mask, kl_coef)
        kl_per_answer = kl.sum(dim=1).mean().item()
        lengths = mask.sum(dim=1).float()
        stats = {
            "score": r.raw_scores.mean().item(),
            "score_with_penalty": r.scores.mean().item(),
            "kl": kl_per_answer,
            "kl_coef": float(kl_coef),
            "entropy": masked_mean(r.entropy, mask).item(),
            "response_length": lengths.mean().item(),
            "has_eos": r.has_eos.float().mean().item(),
            "rollout_s": rollout_s,
        }
        if kl_stop is not None and kl_per_answer > kl_stop:
            return {**stats, "kl_stop": 1.0, "updates": 0.0, "time_s": time.perf_counter() - started}
        advantages, returns = self._advantages(r, rewards)
        history, early_stopped = self._update(r, advantages, returns)

        # detail: adaptive KL control, fed the mean KL per answer (sum over its tokens).
        self.kl_ctl.update(kl_per_answer, r.response_ids.shape[0])
        # a term some minibatches leave out (no preferred answer there) is averaged where it ran
        keys = dict.fromkeys(key for h in history for key in h)
        means = {key: sum(vals) / len(vals) for key in keys if (vals := [h[key] for h in history if key in h])}
        return {
            **stats,
            **means,
            "updates": float(len(history)),
            "early_stopped": float(early_stopped),
            "time_s": time.perf_counter() - started,
        }

    def _advantages(self, r: Rollout, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token advantages (B, T) and, with GAE, the value targets (B, T)."""
        cfg, mask = self.config, r.response_mask
        if cfg.whiten_rewards:
            # detail: reward whitening, scale only (shift_mean=False), TRL's option.
            rewards = whiten(rewards, mask, shift_mean=False)
        if cfg.advantage == "rloo":
            # detail: RLOO: one return per answer (score - beta * its KL), minus the mean
            # return of the other answers to the same prompt, on every token of the answer.
            per_answer = rloo_advantages(rewards.sum(dim=1), cfg.samples_per_prompt)
            advantages = per_answer.unsqueeze(1) * mask
            # detail: scale-only advantage whitening: the leave-one-out baseline already centres.
            return whiten(advantages, mask, shift_mean=False), None
        # detail: GAE (gamma, lambda) on the rollout values; returns = advantages + V.
        advantages, returns = gae(r.values, rewards, mask, cfg.gamma, cfg.lam)
        # detail: advantage whitening over the whole batch (TRL), before minibatching.
        return whiten(advantages, mask), returns

    def _update(self, r: Rollout, advantages: torch.Tensor, returns: torch.Tensor | None) -> tuple[list[dict[str, float]], bool]:
        """``ppo_epochs`` epochs of minibatch updates; the stats of each, and whether the
        approx-KL early stop ended them."""
        cfg = self.config
        history: list[dict[str, float]] = []
        for _epoch in range(cfg.ppo_epochs):
            # detail: shuffled minibatches, a fresh permutation every epoch.
            minibatches = torch.randperm(r.response_ids.shape[0], device=self.device).split(cfg.mini_batch_size)
            # each preferred answer once an epoch, spread over its minibatches (none: off)
            chosen = self._chosen_rows(len(minibatches))
            for idx, chosen_idx in zip(minibatches, chosen, strict=True):
                history.append(self._minibatch(r, idx, advantages, returns, chosen_idx))
                # detail: approx-KL early stopping of the remaining updates.
                if cfg.early_stop_kl is not None and history[-1]["approx_kl"] > cfg.early_stop_kl:
                    self.optimizer.zero_grad(set_to_none=True)
                    return history, True
        self.optimizer.zero_grad(set_to_none=True)
        return history, False

    def _chosen_rows(self, minibatches: int) -> list[torch.Tensor]:
        """The preferred answers of one epoch, shuffled, split into ``minibatches`` parts: all of
        them, or a random ``batch_size`` when there are more, so the votes' answers never
        outweigh the rollouts (their share of the loss stays at most half at a coefficient of 1)."""
        if self.chosen is None:
            return [torch.zeros(0, dtype=torch.long)] * minibatches
        rows = torch.randperm(len(self.chosen.completions), device=self.device)[: self.config.batch_size]
        return list(rows.tensor_split(minibatches))

    def _chosen_loss(self, rows: torch.Tensor, rollout_tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Minus the log-likelihood of the preferred answers ``rows``, summed over their tokens
        and divided by the minibatch's rollout tokens, so each of their tokens weighs as much
        as a rollout token (whose loss is a token mean); and their mean NLL per token."""
        assert self.chosen is not None
        c = self.chosen
        prompt_cols, answer_cols = c.query_mask[rows].bool().any(0), c.response_mask[rows].any(0)
        mask = c.response_mask[rows][:, answer_cols]  # columns only other rows need go
        batch = (
            c.query_ids[rows][:, prompt_cols],
            c.query_mask[rows][:, prompt_cols],
            c.response_ids[rows][:, answer_cols],
            mask,
        )
        logprobs = response_forward(self.model, *batch, self.config.temperature).logprobs
        nll = -(logprobs * mask).sum()
        return nll / rollout_tokens.clamp(min=1), nll.item() / max(1, int(mask.sum()))

    def _minibatch(
        self,
        r: Rollout,
        idx: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor | None,
        chosen: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One clipped PPO update on the rows ``idx`` of the rollout; its stats."""
        cfg = self.config
        m = r.response_mask[idx]
        batch = (r.query_ids[idx], r.query_mask[idx], r.response_ids[idx], m)
        ref_hidden = r.ref_hidden[idx] if r.ref_hidden is not None else None
        logprobs, values, _, kl_to_ref, _ = response_forward(
            self.model, *batch, cfg.temperature, self.value_head, reference_hidden=ref_hidden
        )
        # detail: clipped surrogate policy loss (ratio to the rollout policy).
        pg_loss, step_stats = policy_loss(logprobs, r.logprobs[idx], advantages[idx], m, cfg.cliprange)
        loss = pg_loss
        if kl_to_ref is not None:
            # detail: exact KL to the reference over the vocabulary at every visited
            # state, token mean, in the loss (GRPO puts a sampled estimate there).
            kl_loss = masked_mean(kl_to_ref, m)
            loss = loss + cfg.kl_loss_coef * kl_loss
            step_stats = {**step_stats, "kl_loss": kl_loss.item()}
        if chosen is not None and len(chosen):
            # detail: the voters' preferred answers as extra samples of a fixed advantage
            # (InstructGPT's ptx term, scaled per token like the rollouts' loss), at the
            # rollouts' temperature: the distribution PPO trains.
            chosen_loss, chosen_nll = self._chosen_loss(chosen, m.sum())
            loss = loss + cfg.chosen_loss_coef * chosen_loss
            step_stats = {**step_stats, "chosen_nll": chosen_nll}
        if values is not None and returns is not None:
            # detail: clipped value loss around the rollout values.
            vf_loss, vf_stats = value_loss(values, r.values[idx], returns[idx], m, cfg.cliprange_value)
            # detail: one joint loss, value term weighted by vf_coef.
            loss = loss + cfg.vf_coef * vf_loss
            step_stats = {**step_stats, **vf_stats, "value_loss": vf_loss.item()}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # detail: global gradient-norm clipping.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_params, cfg.max_grad_norm)
        self.optimizer.step()
        return {"policy_loss": pg_loss.item(), "grad_norm": float(grad_norm), **step_stats}

    # ----- the loop -------------------------------------------------------------------
    def train(
        self,
        prompts: list[Messages],
        steps: int | None = None,
        max_seconds: float | None = None,
        progress: Callable[[int, int, dict[str, float]], None] | None = None,
    ) -> TrainResult:
        """Up to ``steps`` (default ``config.steps``) PPO steps over ``prompts``, cycling
        through them ``batch_size / samples_per_prompt`` at a time.

        Stops early, saying why in ``TrainResult.stopped``:
        * time: no step starts that would likely end past ``max_seconds`` (judged by the
          previous step's duration);
        * KL: when a step's rollouts show a KL to the reference above ``config.kl_stop``,
          the previous update went too far: its weights are put back (the policy keeps the
          progress before it) and training ends (CleanRL's ``target_kl`` break, per step).
          The first step is not judged: no update of this call led to it.
        ``progress(step, total, stats)`` is called after every step.
        """
        if not prompts:
            raise ValueError("PPO needs at least one prompt")
        cfg = self.config
        steps = cfg.steps if steps is None else steps
        per_step = cfg.batch_size // cfg.samples_per_prompt
        started = time.perf_counter()
        result = TrainResult(history=[], kept_updates=0)
        before_last_update = None  # the policy's weights before the latest kept update
        for i in range(steps):
            if max_seconds is not None and result.history:
                if time.perf_counter() - started + result.history[-1]["time_s"] > max_seconds:
                    result.stopped = "time budget"
                    break
            batch = [prompts[(i * per_step + j) % len(prompts)] for j in range(per_step)]
            state = adapter_state(self.model, self.policy_adapter)
            # The first rollouts show the starting policy, not an update of this call: one batch
            # reads its KL +-1 nat, and the gate already measured that policy on more answers.
            stats = self.step(batch, kl_stop=cfg.kl_stop if i > 0 else None)
            if stats.get("kl_stop"):
                if before_last_update is not None:
                    restore_adapter_state(self.model, self.policy_adapter, before_last_update)
                    result.kept_updates -= 1
                result.stopped = f"KL {stats['kl']:.2f} > {cfg.kl_stop} nats"
            else:
                result.kept_updates += 1
                before_last_update = state
            stats["kept_updates"] = float(result.kept_updates)
            result.history.append(stats)
            if progress is not None:
                progress(i + 1, steps, stats)
            if result.stopped:
                break
        return result

    def save_policy(self, folder: Path) -> Path:
        """Write the policy adapter (atomically, see ``save_adapter``) and, with GAE, the
        value head beside it (``head.safetensors``). ``folder`` must not exist yet."""
        folder = save_adapter(self.model, self.policy_adapter, Path(folder))
        if self.value_head is not None:
            self.value_head.save(folder)
        return folder

"""PPO trainer: rollouts of a LoRA policy on the shared base, then clipped PPO updates.

One base model holds three roles (no second copy of any weight, no deepcopy):

- policy: the PEFT adapter ``policy_adapter`` (trained);
- reference: the same base inside ``model.disable_adapter()`` (never trained);
- value function: a :class:`ScalarHead` on the policy's last hidden states (trained).

``step`` reads top to bottom like CleanRL's ``ppo.py``; every implementation detail of
"The N Implementation Details of RLHF with PPO" (Huang et al. 2023) that lives here is a
line with a ``# detail:`` comment. The math itself is in :mod:`rlhf_demo.ppo.core`.

Shapes: ``B`` responses, ``P`` prompt length (left padded), ``T`` response length
(right padded after EOS), ``H`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from rlhf_demo.modeling.adapters import save_adapter
from rlhf_demo.modeling.heads import ScalarHead, hidden_size
from rlhf_demo.modeling.quantized import keep_4bit_differentiable
from rlhf_demo.ppo.core import (
    DEFAULT_CHUNK_ROWS,
    PPOConfig,
    apply_missing_eos_penalty,
    entropy_from_logits,
    gae,
    kl_controller,
    kl_penalized_rewards,
    logprobs_from_logits,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)

Messages = list[dict[str, str]]
RewardFn = Callable[[list[Messages], list[str]], torch.Tensor]
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
    values: torch.Tensor  # (B, T) value-head estimates, 0 at padding
    entropy: torch.Tensor  # (B, T) policy entropy at each response position, 0 at padding
    raw_scores: torch.Tensor  # (B,) reward_fn output
    scores: torch.Tensor  # (B,) raw_scores after the missing-EOS penalty
    completions: list[str]


# ── building blocks (pure functions of tensors and a model) ──────────────────────────


def truncate_at_eos(
    response_ids: torch.Tensor, eos_ids: Iterable[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each generated row (B, T) after its first EOS.

    Returns ``(ids, mask, has_eos)``: ids (B, T') with the EOS kept as the last real
    token and ``pad_id`` after it, mask (B, T') bool, has_eos (B,) bool. A row without
    EOS keeps all its tokens. T' is the longest kept row (trailing all-pad columns go).
    """
    eos = torch.tensor(list(eos_ids), device=response_ids.device)
    is_eos = torch.isin(response_ids, eos)
    has_eos = is_eos.any(dim=1)
    T = response_ids.shape[1]
    first_eos = is_eos.long().argmax(dim=1)  # first maximum: the first EOS
    length = torch.where(has_eos, first_eos + 1, torch.full_like(first_eos, T))
    mask = torch.arange(T, device=response_ids.device).unsqueeze(0) < length.unsqueeze(1)
    ids = torch.where(mask, response_ids, torch.full_like(response_ids, pad_id))
    keep = int(length.max()) if T else 0
    return ids[:, :keep], mask[:, :keep], has_eos


def causal_lm(model: Any) -> Any:
    """The transformers ``*ForCausalLM`` inside a PEFT wrapper (LoRA layers are injected
    in place, so the adapter that is active, or disabled, still applies), or ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_forward(
    model: Any,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    value_head: ScalarHead | None = None,
    with_entropy: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One forward pass over prompt + response: log-probs of the response tokens, and
    optionally values and entropies, each (B, T) and 0 at padding.

    ``model`` is a causal LM or a PEFT model; whatever adapter state it is in is what
    gets scored. Differentiable when grad is enabled. Logits are computed only for real
    response tokens, ``chunk_rows`` rows at a time (never a (B, L, V) tensor); with
    grad, each chunk is checkpointed, so backward keeps at most one chunk of logits.
    """
    lm = causal_lm(model)
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)
    # detail: position ids from the attention mask, so left padding does not shift the
    # positions of real tokens (the same ids HF generate used while sampling).
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    hidden = lm.get_decoder()(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state
    P, T = query_ids.shape[1], response_ids.shape[1]
    # detail: logits at position t predict token t + 1: response token j sits at P + j
    # and is predicted by the hidden state at P + j - 1 (P - 1 is the last prompt token,
    # always real with left padding). The value of that state uses the same position.
    hidden = hidden[:, P - 1 : P + T - 1]
    mask = response_mask.bool()
    rows, labels = hidden[mask], response_ids[mask]  # (N, H), (N,): real tokens only
    lm_head = lm.get_output_embeddings()

    def chunk_logits(h: torch.Tensor) -> torch.Tensor:
        # detail: divide logits by the sampling temperature, so the log-probs are those
        # of the distribution the tokens were sampled from (TRL, Huang et al.).
        return (lm_head(h) / temperature).unsqueeze(0)  # (1, n, V)

    def chunk_logprobs(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return logprobs_from_logits(chunk_logits(h), y.unsqueeze(0)).squeeze(0)

    logprob_rows, entropy_rows = [], []
    for h, y in zip(rows.split(chunk_rows), labels.split(chunk_rows), strict=True):
        if torch.is_grad_enabled():  # recomputed in backward: one chunk of logits alive
            logprob_rows.append(checkpoint(chunk_logprobs, h, y, use_reentrant=False))
            continue
        logits = chunk_logits(h)
        logprob_rows.append(logprobs_from_logits(logits, y.unsqueeze(0)).squeeze(0))
        if with_entropy:
            entropy_rows.append(entropy_from_logits(logits).squeeze(0))
    if with_entropy and torch.is_grad_enabled():
        raise ValueError("with_entropy is for monitoring: call under torch.no_grad()")

    def scatter(values: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        return out.masked_scatter(mask, torch.cat(values).float()) if values else out

    logprobs = scatter(logprob_rows)
    values = scatter([value_head(rows)]) if value_head is not None else None
    entropy = scatter(entropy_rows) if with_entropy else None
    return logprobs, values, entropy


def sampling_config(config: PPOConfig, eos_ids: list[int], pad_id: int) -> Any:
    """Generation settings that sample from exactly ``softmax(logits / temperature)``
    (restricted by ``top_p`` only): the model's own defaults must not leak in."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=config.temperature,
        top_p=config.top_p,
        # detail: no top-k (HF's default is 50), no repetition penalty: the policy
        # samples from the same distribution whose log-probs PPO optimises (TRL).
        top_k=0,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )


# ── the trainer ──────────────────────────────────────────────────────────────────────


class PPOTrainer:
    """PPO on the LoRA adapter ``policy_adapter`` of the PEFT model ``model``.

    ``reward_fn(prompts, completions) -> (B,)`` scores the decoded answers (already
    normalised by the caller). Only the policy's LoRA parameters and the value head are
    optimised (AdamW); the base weights and any other adapter are left untouched.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        reward_fn: RewardFn,
        config: PPOConfig,
        policy_adapter: str = "policy",
        value_head: ScalarHead | None = None,
    ) -> None:
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
        if value_head is None:
            value_head = ScalarHead(hidden_size(model))
            # detail: value head zero-initialised (lm-human-preferences): V = 0 at the
            # start, so early advantages are the rewards, not a random head's noise.
            torch.nn.init.zeros_(value_head.linear.weight)
        self.value_head = value_head.to(self.device)
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
        self.eos_ids = sorted(i for i in eos_ids if i is not None)
        pad = tokenizer.pad_token_id
        self.pad_id = self.eos_ids[0] if pad is None else pad
        self.policy_params = self._activate_policy()
        self.trainable_params = self.policy_params + list(self.value_head.parameters())
        # detail: AdamW over the policy LoRA + value head only, eps 1e-5 (CleanRL), no
        # weight decay (decay would pull the LoRA delta, i.e. the policy, to the base).
        self.optimizer = torch.optim.AdamW(self.trainable_params, lr=config.learning_rate, eps=ADAM_EPS, weight_decay=0.0)
        self.kl_ctl = kl_controller(config)

    def _activate_policy(self) -> list[torch.nn.Parameter]:
        """Make the policy the active adapter and its LoRA weights the only trainable
        parameters of the model (PEFT's ``set_adapter`` does this for adapters; the base
        is frozen explicitly too). Called before all policy work: another trainer in
        the process (the reward model's) may have switched adapters in between."""
        self.model.set_adapter(self.policy_adapter)
        tag = f".{self.policy_adapter}."
        params = []
        for name, param in self.model.named_parameters():
            is_policy = "lora_" in name and tag in name
            param.requires_grad_(is_policy)
            if is_policy:
                params.append(param)
        if not params:
            raise ValueError(f"adapter {self.policy_adapter!r} has no LoRA parameters")
        # detail: dropout off for rollouts AND updates (Huang et al.): log-probs of the
        # rollout and of the first update then agree, so the ratio starts at exactly 1.
        self.model.eval()
        # NF4 on CPU: stop bitsandbytes' inference repacking, whose kernel has no backward.
        keep_4bit_differentiable(self.model)
        return params

    # ----- rollout --------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list[Messages]) -> Rollout:
        """Sample one answer per prompt, score it, and recompute log-probs and values."""
        self._activate_policy()
        texts = [self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
        # detail: left padding, so every prompt ends where its answer starts.
        enc = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,  # the chat template already holds its specials
        ).to(self.device)
        query_ids, query_mask = enc["input_ids"], enc["attention_mask"]
        output = self.model.generate(
            input_ids=query_ids,
            attention_mask=query_mask,
            generation_config=sampling_config(self.config, self.eos_ids, self.pad_id),
        )
        # detail: truncate each answer at its first EOS (kept as last token), mask after.
        response_ids, response_mask, has_eos = truncate_at_eos(output[:, query_ids.shape[1] :], self.eos_ids, self.pad_id)
        completions = [
            self.tokenizer.decode(ids[keep], skip_special_tokens=True).strip()
            for ids, keep in zip(response_ids, response_mask, strict=True)
        ]
        raw_scores = torch.as_tensor(self.reward_fn(prompts, completions), dtype=torch.float32).to(self.device).reshape(-1)
        if raw_scores.shape[0] != len(prompts):
            raise ValueError(f"reward_fn gave {raw_scores.shape[0]} scores for {len(prompts)} answers")
        # detail: missing-EOS penalty for answers truncated by max_new_tokens.
        scores = apply_missing_eos_penalty(raw_scores, has_eos, self.config.missing_eos_penalty)
        batch = (query_ids, query_mask, response_ids, response_mask)
        temperature = self.config.temperature
        logprobs, values, entropy = response_forward(self.model, *batch, temperature, self.value_head, with_entropy=True)
        # detail: reference = the same base with adapters disabled (no model copy).
        with self.model.disable_adapter():
            ref_logprobs, _, _ = response_forward(self.model, *batch, temperature)
        assert values is not None and entropy is not None
        return Rollout(
            query_ids=query_ids,
            query_mask=query_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            has_eos=has_eos,
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
            entropy=entropy,
            raw_scores=raw_scores,
            scores=scores,
            completions=completions,
        )

    # ----- one PPO iteration ----------------------------------------------------------
    def step(self, prompts: list[Messages]) -> dict[str, float]:
        """Rollout, advantages, then ``ppo_epochs`` epochs of clipped updates."""
        started = time.perf_counter()
        cfg = self.config
        r = self.rollout(prompts)  # sampled, scored (missing-EOS penalty), recomputed
        mask = r.response_mask
        kl_coef = self.kl_ctl.value
        # detail: per-token KL penalty with the current coefficient; score at the end.
        rewards, kl = kl_penalized_rewards(r.scores, r.logprobs, r.ref_logprobs, mask, kl_coef)
        if cfg.whiten_rewards:
            # detail: reward whitening, scale only (shift_mean=False), TRL's option.
            rewards = whiten(rewards, mask, shift_mean=False)
        # detail: GAE (gamma, lambda) on the rollout values; returns = advantages + V.
        advantages, returns = gae(r.values, rewards, mask, cfg.gamma, cfg.lam)
        # detail: advantage whitening over the whole batch (TRL), before minibatching.
        advantages = whiten(advantages, mask)

        self._activate_policy()
        B = r.response_ids.shape[0]
        history: list[dict[str, float]] = []
        early_stopped = False
        for _epoch in range(cfg.ppo_epochs):
            # detail: shuffled minibatches, a fresh permutation every epoch.
            for idx in torch.randperm(B, device=self.device).split(cfg.mini_batch_size):
                m = mask[idx]
                logprobs, values, _ = response_forward(
                    self.model,
                    r.query_ids[idx],
                    r.query_mask[idx],
                    r.response_ids[idx],
                    m,
                    cfg.temperature,
                    self.value_head,
                )
                assert values is not None
                # detail: clipped surrogate policy loss (ratio to the rollout policy).
                pg_loss, pg_stats = policy_loss(logprobs, r.logprobs[idx], advantages[idx], m, cfg.cliprange)
                # detail: clipped value loss around the rollout values.
                vf_loss, vf_stats = value_loss(values, r.values[idx], returns[idx], m, cfg.cliprange_value)
                # detail: one joint loss, value term weighted by vf_coef.
                loss = pg_loss + cfg.vf_coef * vf_loss
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # detail: global gradient-norm clipping.
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_params, cfg.max_grad_norm)
                self.optimizer.step()
                history.append(
                    {
                        "policy_loss": pg_loss.item(),
                        "value_loss": vf_loss.item(),
                        "grad_norm": float(grad_norm),
                        **pg_stats,
                        **vf_stats,
                    }
                )
                # detail: approx-KL early stopping of the remaining updates.
                if cfg.early_stop_kl is not None and pg_stats["approx_kl"] > cfg.early_stop_kl:
                    early_stopped = True
                    break
            if early_stopped:
                break
        self.optimizer.zero_grad(set_to_none=True)

        # detail: adaptive KL control, fed the mean KL per answer (sum over its tokens).
        kl_per_answer = kl.sum(dim=1).mean().item()
        self.kl_ctl.update(kl_per_answer, B)
        means = {k: sum(h[k] for h in history) / len(history) for k in (history[0] if history else {})}
        lengths = mask.sum(dim=1).float()
        return {
            "score": r.raw_scores.mean().item(),
            "score_with_penalty": r.scores.mean().item(),
            "kl": kl_per_answer,
            "kl_coef": float(kl_coef),
            **means,
            "entropy": masked_mean(r.entropy, mask).item(),
            "response_length": lengths.mean().item(),
            "has_eos": r.has_eos.float().mean().item(),
            "updates": float(len(history)),
            "early_stopped": float(early_stopped),
            "time_s": time.perf_counter() - started,
        }

    # ----- loops and saving -----------------------------------------------------------
    def train(
        self,
        prompt_batches: Iterable[list[Messages]],
        iterations: int,
        max_seconds: float | None = None,
        progress: Callable[[int, int, dict[str, float]], None] | None = None,
    ) -> list[dict[str, float]]:
        """Run up to ``iterations`` steps, one prompt batch each, and return their stats.

        With ``max_seconds``, no step starts that would likely end past the budget
        (judged by the previous step's duration). ``progress(step, total, stats)`` is
        called after every step.
        """
        started = time.perf_counter()
        history: list[dict[str, float]] = []
        for i, prompts in zip(range(iterations), prompt_batches, strict=False):
            if max_seconds is not None and history:
                expected_end = time.perf_counter() - started + history[-1]["time_s"]
                if expected_end > max_seconds:
                    break
            history.append(self.step(prompts))
            if progress is not None:
                progress(i + 1, iterations, history[-1])
        return history

    def save_policy(self, folder: Path) -> Path:
        """Write the policy adapter (atomically, see ``save_adapter``) and, beside it,
        the value head (``head.safetensors``). ``folder`` must not exist yet."""
        folder = save_adapter(self.model, self.policy_adapter, Path(folder))
        self.value_head.save(folder)
        return folder

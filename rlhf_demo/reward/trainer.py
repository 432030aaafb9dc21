"""Reward-model training: fit the reward adapter + head to the votes, then measure it.

Training minimises Bradley-Terry on A/B pairs plus ``thumb_weight`` times the logistic
loss on thumbs; only the reward adapter's LoRA matrices and the head receive gradients
(``use_adapter(..., trainable=True)``), so the shared base never changes.

Data flow::

    store.preference_pairs(), store.thumb_examples()
        -> build_examples()          dedup, majority vote, 👍 x 👎 on one prompt -> pairs   (data.py)
        -> split_holdout()           by prompt hash: stable as data grows, no shared text  (data.py)
        -> train_reward_model()      AdamW, clip 1.0, linear decay, time budget
        -> (RewardModel, RewardMetrics)  held-out accuracy, margin, normalizer, loss curve

The model and its scoring live in :mod:`rlhf_demo.reward.model`; losses, metrics, the
normalizer and the hash split in :mod:`rlhf_demo.reward.losses`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from rlhf_demo.config import LoraSettings, RewardConfig
from rlhf_demo.modeling.adapters import use_adapter
from rlhf_demo.reward.data import _reference_answers, build_examples, split_holdout
from rlhf_demo.reward.losses import (
    bradley_terry_loss,
    fit_normalizer,
    mean_margin,
    pairwise_accuracy,
    thumb_accuracy,
    thumb_loss,
)
from rlhf_demo.reward.model import RewardModel

log = logging.getLogger(__name__)


# ── configuration ────────────────────────────────────────────────────────────────────


# ── results ──────────────────────────────────────────────────────────────────────────


@dataclass
class RewardMetrics:
    """What one reward-model training run measured; typed so that the worker, the
    dashboard and the benchmarks read the same names. Accuracies and margin are on the
    held-out split, None where it has nothing of that kind."""

    ACCURACIES: ClassVar[tuple[str, ...]] = ("pairwise_accuracy", "thumb_accuracy")
    """The held-out accuracies a published version keeps (see :meth:`accuracies`)."""

    pairwise_accuracy: float | None
    mean_margin: float | None
    thumb_accuracy: float | None
    train_pairs: int
    train_thumbs: int
    holdout_pairs: int
    holdout_thumbs: int
    pairs_from_thumbs: int
    """Training + held-out pairs made from 👍 x 👎 answers to one prompt."""
    steps: int
    timed_out: bool
    seconds: float
    final_loss: float | None
    loss_curve: list[float]
    reward_mean: float
    reward_std: float
    normalizer_samples: int
    """Training answers the normalizer was fitted on."""
    warm_start: str | None
    """The folder training continued from; None: a fresh adapter and head."""
    votes_used: int = 0
    """Votes (A/B + thumbs) handed to training, after the per-session cap; set by the worker."""

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able numbers (None where undefined), for run summaries."""
        return dataclasses.asdict(self)

    def accuracies(self) -> dict[str, float | None]:
        """The held-out accuracies by field name: what a version's metrics keep under
        ``"reward"`` and what the dashboard plots."""
        return {name: getattr(self, name) for name in self.ACCURACIES}


# ── training ─────────────────────────────────────────────────────────────────────────


Progress = Callable[[int, int, dict[str, float]], None]
"""``progress(step, total, metrics)``: called after every optimizer step."""


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def side_of(examples: Sequence[dict[str, Any]], side: str) -> tuple[list[Any], list[str], list[bool]]:
    """Prompts, answers and finished flags of one side of the examples: ``"chosen"`` or
    ``"rejected"`` of pairs, ``"completion"`` of thumbs."""
    flag = "finished" if side == "completion" else f"{side}_finished"
    return [ex["prompt"] for ex in examples], [ex[side] for ex in examples], [ex.get(flag, True) for ex in examples]


def encode_side(rm: RewardModel, examples: Sequence[dict[str, Any]], side: str) -> list[list[int]]:
    return rm.encode(*side_of(examples, side))


def _batches(n: int, size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + size] for i in range(0, n, size)]


def evaluate(
    rm: RewardModel,
    pair_examples: Sequence[dict[str, Any]],
    thumb_examples: Sequence[dict[str, Any]],
    batch_size: int = 16,
) -> dict[str, float | None]:
    """Pairwise accuracy and mean margin on pairs, sign accuracy on thumbs (raw scores),
    keyed by their :class:`RewardMetrics` names; None where there is nothing to measure."""
    n = len(pair_examples)
    (p1, c1, f1), (p2, c2, f2) = side_of(pair_examples, "chosen"), side_of(pair_examples, "rejected")
    r = rm.score(p1 + p2, c1 + c2, normalized=False, batch_size=batch_size, finished=f1 + f2)
    prompts, texts, finished = side_of(thumb_examples, "completion")
    t = rm.score(prompts, texts, normalized=False, batch_size=batch_size, finished=finished)
    labels = torch.tensor([bool(ex["label"]) for ex in thumb_examples], dtype=torch.bool)
    return {
        "pairwise_accuracy": _nan_to_none(pairwise_accuracy(r[:n], r[n:])),
        "mean_margin": _nan_to_none(mean_margin(r[:n], r[n:])),
        "thumb_accuracy": _nan_to_none(thumb_accuracy(t, labels)),
    }


def _fit(
    rm: RewardModel,
    params: Sequence[torch.nn.Parameter],
    train_pairs: Sequence[dict[str, Any]],
    train_thumbs: Sequence[dict[str, Any]],
    config: RewardConfig,
    deadline: float | None,
    progress: Progress | None,
) -> tuple[list[float], bool]:
    """The optimisation loop over ``params`` (the reward LoRA, made trainable and active by
    the caller's ``use_adapter``, then the head); returns ``(loss per step, stopped by the
    time budget)``."""
    generator = torch.Generator().manual_seed(config.seed)  # shuffling order
    # Tokenize once; steps only pad and forward.
    chosen_ids, rejected_ids = (encode_side(rm, train_pairs, side) for side in ("chosen", "rejected"))
    thumb_ids = encode_side(rm, train_thumbs, "completion")
    thumb_labels = torch.tensor([bool(ex["label"]) for ex in train_thumbs], dtype=torch.bool)

    bs = config.batch_size
    # Each step takes one batch of pairs AND one of thumbs (while they last), so the
    # step loss is the weighted sum of both objectives.
    steps_per_epoch = max(math.ceil(len(chosen_ids) / bs), math.ceil(len(thumb_ids) / bs))
    total = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    # linear decay to 0 over the planned steps (the transformers/TRL default schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(1, total)))

    curve: list[float] = []
    for _epoch in range(config.epochs):
        pair_batches = _batches(len(chosen_ids), bs, generator)
        thumb_batches = _batches(len(thumb_ids), bs, generator)
        for i in range(steps_per_epoch):
            if deadline is not None and time.monotonic() >= deadline:
                return curve, True
            pb = pair_batches[i] if i < len(pair_batches) else []
            tb = thumb_batches[i] if i < len(thumb_batches) else []
            optimizer.zero_grad(set_to_none=True)  # at the start, so grads stay inspectable
            # one forward over [chosen; rejected; thumbs]
            r = rm.forward_ids([chosen_ids[j] for j in pb] + [rejected_ids[j] for j in pb] + [thumb_ids[j] for j in tb])
            r_chosen, r_rejected, r_thumbs = r[: len(pb)], r[len(pb) : 2 * len(pb)], r[2 * len(pb) :]
            loss = r.new_zeros(())
            metrics: dict[str, float] = {}
            if pb:
                # Bradley-Terry on pairs (+ TRL's optional centering term)
                bt = bradley_terry_loss(r_chosen, r_rejected, config.center_rewards_coefficient)
                loss = loss + bt
                metrics["bt_loss"] = bt.item()
                metrics["batch_accuracy"] = pairwise_accuracy(r_chosen, r_rejected)
            if tb:
                # logistic loss on thumbs, -log sigmoid(y * r)
                tl = thumb_loss(r_thumbs, thumb_labels[tb].to(r_thumbs.device))
                loss = loss + config.thumb_weight * tl
                metrics["thumb_loss"] = tl.item()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)  # clip 1.0
            optimizer.step()
            scheduler.step()
            curve.append(loss.item())
            metrics.update(loss=curve[-1], grad_norm=float(grad_norm), lr=float(scheduler.get_last_lr()[0]))
            if progress is not None:
                progress(len(curve), total, metrics)
    return curve, False


def train_reward_model(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[dict[str, Any]],
    thumbs: Sequence[dict[str, Any]],
    config: RewardConfig | None = None,
    lora_settings: LoraSettings | None = None,
    warm_start: Path | None = None,
    *,
    progress: Progress | None = None,
) -> tuple[RewardModel, RewardMetrics]:
    """Fit the reward adapter + head to the votes; return it and its metrics.

    ``model``: the process's base, bare or already a PeftModel (use the returned
    ``RewardModel.model`` afterwards). ``pairs`` / ``thumbs``: the store's rows.
    ``warm_start``: a folder from :meth:`RewardModel.save` to continue from; else a
    fresh adapter and head. ``progress(step, total, metrics)`` is called after every
    optimizer step. The model is given back as found (active adapter, ``requires_grad``
    flags, train/eval mode); the reward adapter ends frozen.
    """
    config = config or RewardConfig()
    started = time.monotonic()
    deadline = None if config.max_seconds is None else started + config.max_seconds

    pair_examples, thumb_examples = build_examples(pairs, thumbs, config.max_thumb_pairs_per_prompt)
    if not pair_examples and not thumb_examples:
        raise ValueError("no usable feedback: need at least one decisive A/B vote or thumb")
    train_pairs, holdout_pairs = split_holdout(pair_examples, config.holdout_fraction)
    train_thumbs, holdout_thumbs = split_holdout(thumb_examples, config.holdout_fraction)

    torch.manual_seed(config.seed)  # adapter (LoRA A) and head init
    if warm_start is not None:
        rm = RewardModel.load(model, tokenizer, Path(warm_start), config.adapter_name, config.max_length)
    else:
        rm = RewardModel.new(model, tokenizer, lora_settings, config.adapter_name, config.max_length)
    with use_adapter(rm.model, rm.name, trainable=True) as lora:
        used_thumbs = train_thumbs if config.thumb_weight > 0 else []
        params = lora + list(rm.head.parameters())
        curve, timed_out = _fit(rm, params, train_pairs, used_thumbs, config, deadline, progress)

    # Normalizer: raw scores of the training answers, so PPO sees ~N(0, 1).
    eval_bs = 2 * config.batch_size
    ref_prompts, ref_texts, ref_finished = _reference_answers(train_pairs, train_thumbs, config.normalizer_samples)
    rm.mean, rm.std = fit_normalizer(rm.score(ref_prompts, ref_texts, normalized=False, batch_size=eval_bs, finished=ref_finished))

    metrics = RewardMetrics(
        **evaluate(rm, holdout_pairs, holdout_thumbs, batch_size=eval_bs),
        train_pairs=len(train_pairs),
        train_thumbs=len(train_thumbs),
        holdout_pairs=len(holdout_pairs),
        holdout_thumbs=len(holdout_thumbs),
        pairs_from_thumbs=sum(ex["source"] == "thumbs" for ex in pair_examples),
        steps=len(curve),
        timed_out=timed_out,
        seconds=time.monotonic() - started,
        final_loss=curve[-1] if curve else None,
        loss_curve=curve,
        reward_mean=rm.mean,
        reward_std=rm.std,
        normalizer_samples=len(ref_texts),
        warm_start=None if warm_start is None else str(warm_start),
    )
    log.info(
        "reward model: %d steps in %.1fs, held-out pair accuracy %s, thumb accuracy %s",
        metrics.steps,
        metrics.seconds,
        metrics.pairwise_accuracy,
        metrics.thumb_accuracy,
    )
    return rm, metrics


__all__ = ["Progress", "RewardConfig", "RewardMetrics", "evaluate", "train_reward_model"]

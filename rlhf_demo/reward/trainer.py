"""Reward-model training: fit the probe to the votes and measure how far to trust it.

Data flow::

    store.preference_pairs(), store.thumb_examples()
        -> build_examples()          dedup, majority vote, 👍 x 👎 on one prompt -> pairs   (data.py)
        -> RewardModel.features()    each distinct answer read once by the frozen base    (model.py)
        -> cross_validate()          k folds by prompt: agreement with votes not fitted on
        -> fit_probe()               Bradley-Terry on pairs + thumb_weight x logistic on thumbs + L2,
                                     full batch L-BFGS, on all votes
        -> fit_ensemble()            the same fit on bootstrap resamples of the prompts: the
                                     ensemble whose spread Compare's pair selection explores
        -> (RewardModel, RewardMetrics)

The agreement's lower bound is what the worker checks before it spends a PPO phase on the
reward model (``GateConfig.min_reward_agreement``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rlhf_demo.config import RewardConfig
from rlhf_demo.modeling.heads import hidden_size
from rlhf_demo.reward.data import build_examples
from rlhf_demo.reward.losses import (
    bradley_terry_loss,
    example_key,
    fit_normalizer,
    mean_margin,
    pairwise_accuracy,
    thumb_loss,
)
from rlhf_demo.reward.model import RewardModel, default_layer

log = logging.getLogger(__name__)


# ── results ──────────────────────────────────────────────────────────────────────────


@dataclass
class RewardMetrics:
    """What one reward-model fit measured; typed so that the worker, the dashboard and the
    benchmarks read the same names. Accuracies, margin and agreement are cross-validated
    (each vote judged by a probe fitted without its prompt), None where nothing of that
    kind could be judged."""

    ACCURACIES: ClassVar[tuple[str, ...]] = ("pairwise_accuracy", "thumb_accuracy", "agreement")
    """The accuracies a published version keeps (see :meth:`accuracies`)."""

    pairwise_accuracy: float | None
    thumb_accuracy: float | None
    """Share of (👍, 👎) answer pairs ranked right, each by a probe fitted without both
    (leave-pair-out, :func:`cross_validate`)."""
    mean_margin: float | None
    agreement: float | None
    """Share of held-out judgements (pairs and thumbs together) the probe got right."""
    agreement_lower_bound: float | None
    """One-sided lower confidence bound (Wilson, ``RewardConfig.confidence``) on ``agreement``,
    with one right and one wrong judgement added (a uniform prior)."""
    judged: int
    """Held-out judgements behind ``agreement``: A/B pairs, plus one per (👍, 👎) pair ranked
    (``min(#👍, #👎)``, at most ``LEFT_OUT_THUMB_PAIRS``)."""
    pairs: int
    thumbs: int
    pairs_from_thumbs: int
    """Pairs made from 👍 x 👎 answers to one prompt (part of ``pairs``)."""
    prompts: int
    answers: int
    """Distinct answers read by the base."""
    answers_left_out: int
    """Answers not read within the time budget; their votes were not used."""
    layer: int
    seconds: float
    feature_seconds: float
    reward_mean: float
    reward_std: float
    votes_used: int = 0
    """Votes (A/B + thumbs) handed to training, after the per-session cap; set by the worker."""

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able numbers (None where undefined), for run summaries."""
        return dataclasses.asdict(self)

    def accuracies(self) -> dict[str, float | None]:
        """The accuracies by field name: what a version's metrics keep under ``"reward"``
        and what the dashboard plots."""
        return {name: getattr(self, name) for name in self.ACCURACIES}


Progress = Callable[[int, int, dict[str, float]], None]
"""``progress(done, total, metrics)``: called after every batch of answers read."""


# ── the data the probe sees ──────────────────────────────────────────────────────────


@dataclass
class ProbeData:
    """Feature rows of the votes: pairs as (chosen, rejected), thumbs with their labels,
    and each vote's prompt group (the unit of cross-validation)."""

    chosen: torch.Tensor  # (P, H)
    rejected: torch.Tensor  # (P, H)
    pair_groups: list[str]
    thumbs: torch.Tensor  # (T, H)
    labels: torch.Tensor  # (T,) +1 / -1
    thumb_groups: list[str]
    answers: torch.Tensor  # (A, H) every distinct answer: the standardisation and the normalizer

    def subset(self, pair_rows: list[int], thumb_rows: list[int]) -> ProbeData:
        return ProbeData(
            self.chosen[pair_rows],
            self.rejected[pair_rows],
            [self.pair_groups[i] for i in pair_rows],
            self.thumbs[thumb_rows],
            self.labels[thumb_rows],
            [self.thumb_groups[i] for i in thumb_rows],
            self.answers,
        )


def _answer_key(prompt: Any, text: str, finished: bool) -> str:
    return example_key(prompt, text) + ("" if finished else ":cut")


def read_features(
    rm: RewardModel,
    pair_examples: Sequence[dict[str, Any]],
    thumb_examples: Sequence[dict[str, Any]],
    config: RewardConfig,
    progress: Progress | None = None,
) -> tuple[ProbeData, int]:
    """Each distinct answer of the examples read once by the base; returns the data and how
    many answers the time budget left unread (their examples are dropped)."""
    answers: dict[str, tuple[Any, str, bool]] = {}
    for ex in pair_examples:
        for side in ("chosen", "rejected"):
            finished = ex.get(f"{side}_finished", True)
            answers.setdefault(_answer_key(ex["prompt"], ex[side], finished), (ex["prompt"], ex[side], finished))
    for ex in thumb_examples:
        finished = ex.get("finished", True)
        answers.setdefault(_answer_key(ex["prompt"], ex["completion"], finished), (ex["prompt"], ex["completion"], finished))
    keys = list(answers)
    deadline = None if config.max_seconds is None else time.monotonic() + config.max_seconds
    rows: dict[str, torch.Tensor] = {}
    step = max(1, config.batch_size) * 4
    for first in range(0, len(keys), step):
        if deadline is not None and time.monotonic() >= deadline:
            break
        chunk = keys[first : first + step]
        prompts, texts, finished = zip(*(answers[k] for k in chunk), strict=True)
        feats = rm.features(list(prompts), list(texts), list(finished), config.batch_size)
        rows.update(zip(chunk, feats, strict=True))
        if progress is not None:
            progress(len(rows), len(keys), {"answers_read": float(len(rows))})

    def row(prompt: Any, text: str, finished: bool) -> torch.Tensor | None:
        return rows.get(_answer_key(prompt, text, finished))

    size = rm.weight.shape[0]
    chosen, rejected, pair_groups = [], [], []
    for ex in pair_examples:
        c, r = (
            row(ex["prompt"], ex["chosen"], ex.get("chosen_finished", True)),
            row(ex["prompt"], ex["rejected"], ex.get("rejected_finished", True)),
        )
        if c is not None and r is not None:
            chosen.append(c)
            rejected.append(r)
            pair_groups.append(ex["group"])
    thumbs, labels, thumb_groups = [], [], []
    for ex in thumb_examples:
        t = row(ex["prompt"], ex["completion"], ex.get("finished", True))
        if t is not None:
            thumbs.append(t)
            labels.append(1.0 if ex["label"] else -1.0)
            thumb_groups.append(ex["group"])

    def stack(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(xs) if xs else torch.zeros(0, size)

    data = ProbeData(
        stack(chosen), stack(rejected), pair_groups, stack(thumbs), torch.tensor(labels), thumb_groups, stack(list(rows.values()))
    )
    return data, len(keys) - len(rows)


# ── fitting ──────────────────────────────────────────────────────────────────────────


def fit_probe(data: ProbeData, config: RewardConfig) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """``(weight, bias, feature_mean, feature_std)`` minimising Bradley-Terry on the pairs
    + ``thumb_weight`` x logistic loss on the thumbs + ``l2`` x |w|², over features
    standardised by every distinct answer. Full batch L-BFGS: convex, so the fit is the
    same whatever the order of the votes."""
    mean = data.answers.mean(0) if len(data.answers) else torch.zeros(data.chosen.shape[1])
    std = data.answers.std(0, correction=0) + 1e-4 if len(data.answers) > 1 else torch.ones_like(mean)
    diff = (data.chosen - data.rejected) / std  # the mean cancels in a pair
    thumbs = (data.thumbs - mean) / std
    weight = torch.zeros(mean.shape[0], dtype=torch.float32, requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    use_thumbs = config.thumb_weight > 0 and len(thumbs) > 0
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=config.max_iterations, line_search_fn="strong_wolfe")

    def loss_fn() -> torch.Tensor:
        optimizer.zero_grad()
        loss = config.l2 * weight.square().sum()
        if len(diff):
            margin = diff @ weight
            loss = loss + bradley_terry_loss(margin, torch.zeros_like(margin))
        if use_thumbs:
            loss = loss + config.thumb_weight * thumb_loss(thumbs @ weight + bias, data.labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(loss_fn)
    return weight.detach(), float(bias.detach()) if use_thumbs else 0.0, mean, std


def fit_ensemble(data: ProbeData, config: RewardConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(members (M, H), member_bias (M,))``: ``config.ensemble`` probes, each fitted on a
    bootstrap resample of the prompts (a prompt's votes stay together, as in the folds),
    on the main probe's standardisation. Their disagreement on an answer is what the votes
    have not settled yet: the epistemic spread that double Thompson sampling explores."""
    size = data.answers.shape[1] if len(data.answers) else data.chosen.shape[1]
    groups = sorted(set(data.pair_groups) | set(data.thumb_groups))
    if config.ensemble == 0 or not groups:
        return torch.zeros(0, size), torch.zeros(0)
    rng = torch.Generator().manual_seed(seed)
    weights, biases = [], []
    for _ in range(config.ensemble):
        drawn = torch.randint(len(groups), (len(groups),), generator=rng).tolist()
        times = {g: drawn.count(i) for i, g in enumerate(groups)}
        pair_rows = [i for i, g in enumerate(data.pair_groups) for _ in range(times[g])]
        thumb_rows = [i for i, g in enumerate(data.thumb_groups) for _ in range(times[g])]
        weight, bias, _, _ = fit_probe(data.subset(pair_rows, thumb_rows), config)
        weights.append(weight)
        biases.append(bias)
    return torch.stack(weights), torch.tensor(biases)


def _scores(probe: tuple[torch.Tensor, float, torch.Tensor, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    weight, bias, mean, std = probe
    return ((features - mean) / std) @ weight + bias


def _fold(group: str, folds: int) -> int:
    return int(hashlib.sha256(group.encode()).hexdigest()[:8], 16) % folds


def cross_validate(data: ProbeData, config: RewardConfig) -> dict[str, Any]:
    """Each vote judged by a probe fitted on the other folds (folds by prompt, so no answer
    is both fitted and judged). Returns accuracies, margin, pooled agreement and its
    one-sided Wilson lower bound, and how many judgements it rests on.

    Thumbs are judged by ranking, not by sign: whether a 👍 answer scores above a 👎 one. A
    sign accuracy would trust a probe that only learned the base rate (with 2 👍 among 44
    thumbs, "always 👎" is 95 % right), while PPO only uses the ranking. Each 👍 is paired
    with one 👎 (disjoint pairs, so two 👍 cannot look like forty votes: ``min(#👍, #👎)``
    judgements at most) and the pair is ranked by a probe fitted without both prompts'
    votes (leave-pair-out). A visitor rates one answer per prompt, so a fold rarely holds
    both kinds: ranking within folds left ten thumbs 1-3 judgements, and ranking
    out-of-fold scores pooled over folds is biased low on few votes (each fold's probe is
    fitted on the opposite balance of the labels it then scores: 0.35 on labels with no
    rule, where leave-pair-out reads 0.51, docs/learning.md); leave-pair-out is not."""
    folds = min(config.folds, len(set(data.pair_groups) | set(data.thumb_groups)))
    margins: list[torch.Tensor] = []
    if folds >= 2:
        pair_fold = [_fold(g, folds) for g in data.pair_groups]
        thumb_fold = [_fold(g, folds) for g in data.thumb_groups]
        for k in range(folds):
            test_p = [i for i, f in enumerate(pair_fold) if f == k]
            test_t = [i for i, f in enumerate(thumb_fold) if f == k]
            train_p = [i for i, f in enumerate(pair_fold) if f != k]
            train_t = [i for i, f in enumerate(thumb_fold) if f != k]
            if not (test_p or test_t) or not (train_p or train_t):
                continue
            probe = fit_probe(data.subset(train_p, train_t), config)
            margins.append(_scores(probe, data.chosen[test_p]) - _scores(probe, data.rejected[test_p]))
    thumb_right, thumb_judged = _thumb_pairs_left_out(data, config)
    margin = torch.cat(margins) if margins else torch.zeros(0)
    right = float(((margin > 0).float() + 0.5 * (margin == 0).float()).sum()) + thumb_right
    judged = len(margin) + thumb_judged
    agreement = right / judged if judged else None
    return {
        "pairwise_accuracy": _none_if_nan(pairwise_accuracy(margin, torch.zeros_like(margin))),
        "thumb_accuracy": thumb_right / thumb_judged if thumb_judged else None,
        "mean_margin": _none_if_nan(mean_margin(margin, torch.zeros_like(margin))),
        "agreement": agreement,
        # plus one right and one wrong judgement (a uniform prior): two lucky comparisons
        # must not earn the trust that PPO is then spent on
        "agreement_lower_bound": None
        if agreement is None
        else wilson_lower_bound((right + 1) / (judged + 2), int(judged) + 2, config.confidence),
        "judged": int(judged),
    }


LEFT_OUT_THUMB_PAIRS = 32
"""Probe fits the thumbs' check may take per cycle (about 0.2 s each on a CPU); 32
judgements already carry the trust bound past chance or not."""


def _thumb_pairs_left_out(data: ProbeData, config: RewardConfig) -> tuple[float, int]:
    """``(right, judged)``: each 👍 paired with a 👎 (in a stable pseudo-random order of their
    prompts), ranked by a probe fitted on every vote but those of the two prompts."""

    def order(i: int) -> str:
        return hashlib.sha256(f"{data.thumb_groups[i]}#{i}".encode()).hexdigest()

    up = sorted((i for i, y in enumerate(data.labels.tolist()) if y > 0), key=order)
    down = sorted((i for i, y in enumerate(data.labels.tolist()) if y < 0), key=order)
    right, judged = 0.0, 0
    for a, b in list(zip(up, down, strict=False))[:LEFT_OUT_THUMB_PAIRS]:
        left_out = {data.thumb_groups[a], data.thumb_groups[b]}
        train_p = [i for i, g in enumerate(data.pair_groups) if g not in left_out]
        train_t = [i for i, g in enumerate(data.thumb_groups) if g not in left_out]
        if not train_p and not train_t:
            continue
        good, bad = _scores(fit_probe(data.subset(train_p, train_t), config), data.thumbs[[a, b]]).tolist()
        right += 1.0 if good > bad else 0.5 if good == bad else 0.0
        judged += 1
    return right, judged


def wilson_lower_bound(rate: float, n: int, confidence: float) -> float:
    """One-sided Wilson score lower bound of a proportion ``rate`` seen over ``n`` trials."""
    z = statistics.NormalDist().inv_cdf(confidence)
    centre = rate + z * z / (2 * n)
    spread = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


# ── training ─────────────────────────────────────────────────────────────────────────


def train_reward_model(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[dict[str, Any]],
    thumbs: Sequence[dict[str, Any]],
    config: RewardConfig | None = None,
    *,
    progress: Progress | None = None,
) -> tuple[RewardModel, RewardMetrics]:
    """Fit the probe to the votes on the process's base ``model`` (bare or a PeftModel; its
    adapters are switched off while reading and given back as found); return it and its
    cross-validated metrics.

    ``pairs`` / ``thumbs``: the store's rows. ``progress(done, total, metrics)`` is called
    after every batch of answers read."""
    config = config or RewardConfig()
    started = time.monotonic()
    pair_examples, thumb_examples = build_examples(pairs, thumbs, config.max_thumb_pairs_per_prompt)
    if not pair_examples and not thumb_examples:
        raise ValueError("no usable feedback: need at least one decisive A/B vote or thumb")
    layer = config.layer if config.layer is not None else default_layer(model)
    rm = RewardModel(model, tokenizer, layer, torch.zeros(hidden_size(model)), max_length=config.max_length)
    data, left_out = read_features(rm, pair_examples, thumb_examples, config, progress)
    feature_seconds = time.monotonic() - started
    if not len(data.chosen) and not len(data.thumbs):
        raise TimeoutError("the reward model's time budget ran out before any vote was read")

    held_out = cross_validate(data, config)
    rm.weight, rm.bias, rm.feature_mean, rm.feature_std = fit_probe(data, config)
    rm.members, rm.member_bias = fit_ensemble(data, config, seed=len(data.chosen) + len(data.thumbs))
    rm.mean, rm.std = fit_normalizer(rm.score_features(data.answers))

    metrics = RewardMetrics(
        **held_out,
        pairs=len(data.chosen),
        thumbs=len(data.thumbs),
        pairs_from_thumbs=sum(ex["source"] == "thumbs" for ex in pair_examples),
        prompts=len(set(data.pair_groups) | set(data.thumb_groups)),
        answers=len(data.answers),
        answers_left_out=left_out,
        layer=layer,
        seconds=time.monotonic() - started,
        feature_seconds=feature_seconds,
        reward_mean=rm.mean,
        reward_std=rm.std,
    )
    log.info(
        "reward model: %d pairs, %d thumbs, %d answers read in %.1fs; held-out agreement %s (lower bound %s over %d)",
        metrics.pairs,
        metrics.thumbs,
        metrics.answers,
        feature_seconds,
        metrics.agreement,
        metrics.agreement_lower_bound,
        metrics.judged,
    )
    return rm, metrics


__all__ = [
    "ProbeData",
    "Progress",
    "RewardConfig",
    "RewardMetrics",
    "cross_validate",
    "fit_ensemble",
    "fit_probe",
    "train_reward_model",
    "wilson_lower_bound",
]

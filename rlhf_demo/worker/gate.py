"""The promotion gate: a candidate is served only if it is better, close enough, and sane.

Checked on held-out prompts (never used for the PPO update), several answers per prompt
and side: the candidate's reward-model gain over the active version, paired by prompt,
must be positive with confidence (a bootstrap lower bound, not a raw mean against a fixed
margin: with a few prompts a raw mean is within its own sampling noise), the KL to the
reference must stay under a bound, and the answers must not be degenerate.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import asdict, dataclass, field

from rlhf_demo.config import GateConfig


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    candidate_score: float = 0.0
    active_score: float = 0.0
    improvement: float = 0.0  # mean paired gain, candidate - active
    lower_bound: float = 0.0  # its one-sided bootstrap lower bound at ``confidence``
    confidence: float = 0.0
    units: int = 0  # paired units the bound is over (prompts, or answers when prompts are few)
    kl: float = 0.0
    degenerate_fraction: float = 0.0

    def as_metrics(self) -> dict[str, object]:
        return asdict(self)


def is_degenerate(text: str, min_distinct_ratio: float) -> bool:
    """Empty answers and repetition loops ("the the the …") are degenerate."""
    words = text.split()
    if not words:
        return True
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    if len(grams) < 8:
        return False
    return len(set(grams)) / len(grams) < min_distinct_ratio


def paired_lower_bound(differences: list[float], confidence: float, resamples: int = 2000, seed: int = 0) -> float:
    """One-sided percentile-bootstrap lower bound of the mean of paired ``differences``:
    the gain is at least this with probability ``confidence``. Seeded: the same figures
    always give the same decision."""
    if len(differences) < 2:
        return float("-inf")  # one pair says nothing about noise
    rng = random.Random(seed)
    n = len(differences)
    means = sorted(statistics.fmean(rng.choices(differences, k=n)) for _ in range(resamples))
    return means[int((1.0 - confidence) * resamples)]


def evaluate_gate(
    candidate_scores: list[float],
    active_scores: list[float],
    kl_per_answer: list[float],
    candidate_texts: list[str],
    config: GateConfig,
    group_size: int = 1,
) -> GateResult:
    """Pure decision from measured figures, so it is testable without a model.

    ``candidate_scores[i]`` and ``active_scores[i]`` answer the same prompt, in groups of
    ``group_size`` consecutive answers per prompt. The unit of the paired comparison is the
    prompt (mean over its answers; answers to one prompt are not independent), or each
    answer pair when there are fewer than 5 prompts.
    """
    if not candidate_scores or len(candidate_scores) != len(active_scores):
        return GateResult(False, ["no held-out prompts to evaluate on"])
    diffs = [c - a for c, a in zip(candidate_scores, active_scores, strict=True)]
    if len(diffs) // max(1, group_size) >= 5 and len(diffs) % max(1, group_size) == 0:
        diffs = [statistics.fmean(diffs[i : i + group_size]) for i in range(0, len(diffs), group_size)]
    cand, act = statistics.fmean(candidate_scores), statistics.fmean(active_scores)
    lower = paired_lower_bound(diffs, config.confidence)
    kl = statistics.fmean(kl_per_answer) if kl_per_answer else 0.0
    degenerate = sum(is_degenerate(t, config.min_distinct_ratio) for t in candidate_texts) / max(1, len(candidate_texts))
    reasons = []
    if not lower > config.min_improvement:
        reasons.append(
            f"reward not better with {config.confidence:.0%} confidence: gain {cand - act:+.3f}, "
            f"lower bound {lower:+.3f} over {len(diffs)} paired units (needs > {config.min_improvement:+.2f})"
        )
    if kl > config.max_kl:
        reasons.append(f"KL to reference {kl:.2f} nats > {config.max_kl}")
    if degenerate > config.max_degenerate_fraction:
        reasons.append(f"{degenerate:.0%} degenerate answers (empty or looping)")
    return GateResult(not reasons, reasons, cand, act, cand - act, lower, config.confidence, len(diffs), kl, degenerate)

"""The promotion gate: a candidate is served only if it is better, close enough, and sane.

Checked on held-out prompts (never used for the PPO update): the reward model's mean score
of the candidate must beat the active version's by a margin, the KL to the reference must
stay under a bound, and the answers must not be degenerate (empty, or looping).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class GateConfig:
    """Thresholds; documented defaults match the learning benchmark's targets."""

    min_improvement: float = 0.05  # in normalized reward units (std of the reference batch)
    max_kl: float = 6.0  # nats per answer, mean over held-out prompts
    max_degenerate_fraction: float = 0.25
    min_distinct_ratio: float = 0.3  # distinct word 3-grams / all 3-grams in one answer


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    candidate_score: float = 0.0
    active_score: float = 0.0
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


def evaluate_gate(
    candidate_scores: list[float],
    active_scores: list[float],
    kl_per_answer: list[float],
    candidate_texts: list[str],
    config: GateConfig,
) -> GateResult:
    """Pure decision from measured figures, so it is testable without a model."""
    if not candidate_scores or not active_scores:
        return GateResult(False, ["no held-out prompts to evaluate on"])
    cand = sum(candidate_scores) / len(candidate_scores)
    act = sum(active_scores) / len(active_scores)
    kl = sum(kl_per_answer) / max(1, len(kl_per_answer))
    degenerate = sum(is_degenerate(t, config.min_distinct_ratio) for t in candidate_texts) / max(1, len(candidate_texts))
    reasons = []
    if cand - act < config.min_improvement:
        reasons.append(f"reward not better: {cand:+.3f} vs active {act:+.3f} (needs +{config.min_improvement})")
    if kl > config.max_kl:
        reasons.append(f"KL to reference {kl:.2f} nats > {config.max_kl}")
    if degenerate > config.max_degenerate_fraction:
        reasons.append(f"{degenerate:.0%} degenerate answers (empty or looping)")
    return GateResult(not reasons, reasons, cand, act, kl, degenerate)

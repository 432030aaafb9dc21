"""Human win-rates between adapter versions from all Compare-tab votes, arena style.

Ratings are a Bradley–Terry fit (reported on the Elo scale, 400·log10 odds, anchored at
1000 for ``v0``/the base) with a bootstrap interval over votes, as Chatbot-Arena-style
leaderboards do. Ties count half a win each way; "both bad" is no match.
Pure Python + torch-free, so the dashboard can call it in the serving process cheaply.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

Match = tuple[str, str, float]  # (version_a, version_b, score of a: 1, 0.5 or 0)


def matches_from_votes(votes: Sequence[dict[str, str]]) -> list[Match]:
    scores = {"A": 1.0, "B": 0.0, "tie": 0.5}
    return [(v["version_a"], v["version_b"], scores[v["outcome"]]) for v in votes if v["outcome"] in scores]


def _order(name: str) -> tuple[int, str]:
    digits = name[1:] if name.startswith("v") else ""
    return (int(digits), name) if digits.isdigit() else (-1, name)


def bradley_terry(matches: Sequence[Match], iterations: int = 200, anchor: str | None = None) -> dict[str, float]:
    """Elo-scale ratings by the minorization–maximization fit of Hunter (2004)."""
    players = sorted({p for a, b, _ in matches for p in (a, b)}, key=_order)
    if not players:
        return {}
    wins: dict[str, float] = defaultdict(float)
    games: dict[tuple[str, str], float] = defaultdict(float)
    for a, b, s in matches:
        wins[a] += s
        wins[b] += 1 - s
        games[a, b] += 1
        games[b, a] += 1
    strength = dict.fromkeys(players, 1.0)
    for _ in range(iterations):
        new = {}
        for p in players:
            denom = sum(n / (strength[p] + strength[q]) for (x, q), n in games.items() if x == p)
            # prior: one virtual game, drawn, against a strength-1 player, so a version that
            # won (or lost) every vote still gets a finite rating
            new[p] = (wins[p] + 0.5) / (denom + 1.0 / (strength[p] + 1.0))
        norm = math.exp(sum(math.log(v) for v in new.values()) / len(new))
        strength = {p: v / norm for p, v in new.items()}
    anchor = anchor if anchor in strength else players[0]
    base = strength[anchor]
    return {p: 1000 + 400 * math.log10(strength[p] / base) for p in players}


@dataclass
class VersionRow:
    version: str
    rating: float
    low: float
    high: float
    opponents: str  # the versions it was compared with, in version order
    win_rate: float | None  # its score over all its matches (a tie counts half)
    votes: int  # the matches it played (every Compare vote between it and another version)
    rank: int = 0  # 1 = best rating


def leaderboard(matches: Sequence[Match], rounds: int = 200, seed: int = 0) -> list[VersionRow]:
    """Every version that played, from all Compare matches between any two versions: a
    Bradley–Terry rating (anchored at the oldest version = 1000), a 95 % bootstrap interval,
    its matches and win-rate, in version order with its rank by rating.

    Each bootstrap fit is shifted to the point fit's mean rating before it is read, so the
    interval is the uncertainty against the field; anchoring it at the oldest version gave
    that version a zero-width interval (1000–1000) however few votes it had."""
    if not matches:
        return []
    point = bradley_terry(matches)
    anchor = min(point, key=_order)
    mean = sum(point.values()) / len(point)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        resampled = [matches[rng.randrange(len(matches))] for _ in matches]
        fit = bradley_terry(resampled, iterations=60, anchor=anchor)
        shift = mean - sum(fit.values()) / len(fit) if len(fit) == len(point) else 0.0
        for p, r in fit.items():
            samples[p].append(r + shift)
    ordered = sorted(point, key=_order)
    shown = {p: round(r) for p, r in point.items()}  # ratings as the table shows them: equal ones share a rank
    ranks = {p: 1 + sum(other > shown[p] for other in shown.values()) for p in point}
    rows = []
    for p in ordered:
        played = [(a, b, s) for a, b, s in matches if p in (a, b)]
        score = sum(s if a == p else 1 - s for a, b, s in played)
        opponents = sorted({b if a == p else a for a, b, _ in played}, key=_order)
        values = sorted(samples[p]) or [point[p]]
        lo, hi = values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))]
        lo, hi = min(lo, point[p]), max(hi, point[p])
        rows.append(
            VersionRow(p, point[p], lo, hi, ", ".join(opponents), score / len(played) if played else None, len(played), ranks[p])
        )
    return rows

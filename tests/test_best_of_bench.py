"""bench/best_of.py's exact best-of-n expectation: the same as enumerating every n-subset."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from bench.best_of import expected_win, pick_chances


def enumerated(wins: list[float], order: list[float], n: int) -> float:
    """Every n-subset, the pick its highest score makes (equal highest: their mean)."""
    got = []
    for subset in itertools.combinations(range(len(wins)), n):
        top = max(order[i] for i in subset)
        got.append(statistics.fmean(wins[i] for i in subset if order[i] == top))
    return statistics.fmean(got)


@pytest.mark.parametrize("seed", range(5))
def test_expected_win_is_the_mean_over_all_subsets(seed: int) -> None:
    rng = random.Random(seed)
    m = rng.randint(4, 9)
    wins = [rng.choice((0.0, 0.5, 1.0, 0.25)) for _ in range(m)]
    order = [float(rng.randint(0, 3)) for _ in range(m)]  # many equal scores, as a rater gives
    for n in range(1, m + 1):
        assert expected_win(wins, order, n) == pytest.approx(enumerated(wins, order, n))
        assert sum(pick_chances(order, n)) == pytest.approx(1.0)


def test_n_of_one_is_the_plain_mean_and_n_of_all_is_the_top() -> None:
    wins, order = [0.0, 1.0, 0.5], [3.0, 1.0, 2.0]
    assert expected_win(wins, order, 1) == pytest.approx(0.5)
    assert expected_win(wins, order, 3) == 0.0  # the highest-scored answer, whatever it wins
    with pytest.raises(ValueError):
        pick_chances(order, 4)


def test_summary_is_the_mean_over_seeds_per_rater_and_n() -> None:
    from bench.best_of import summarize

    def result(seed: int, rate: float) -> dict:
        rows = {"1": {"win_rate": 0.5, "gain": 0.0}, "4": {"win_rate": rate, "gain": rate - 0.5}}
        meta = {"run": f"r{seed}", "rater": "bench.raters:brevity", "seed": seed, "version": "v1", "reward_run": "run-3"}
        return {**meta, "trusted": True, "reward_model": rows, "served": rows, "oracle": rows}

    summary = summarize([result(2, 0.8), result(1, 0.6)])
    brevity = summary["raters"]["bench.raters:brevity"]
    assert brevity["seeds"] == [1, 2] and len(summary["runs"]) == 2
    assert brevity["served"]["4"]["win_rate"] == pytest.approx(0.7) and brevity["served"]["4"]["gain"] == pytest.approx(0.2)
    assert brevity["served"]["4"]["win_rate_se"] == pytest.approx(0.1)

"""The exact best-of-n expectation (bench/learning_eval.py; the learning bench's evaluation and
bench/best_of.py read it): the same as enumerating every n-subset, and as what
``selection.best_answer`` serves from n samples."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest
import torch

from bench.learning_eval import evaluate, expected_win, pick_chances, served_answers
from rlhf_demo.config import SelectionSettings
from rlhf_demo.selection import Pick, best_answer
from rlhf_demo.serving.sampling import Generation, Sampling

SAMPLING = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=8)


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


def answer(text: str, prompt: str = "hi") -> Generation:
    return Generation(text, "v1", [{"role": "user", "content": prompt}], SAMPLING, 3, len(text.split()), 0.0, "stop")


class ScoresByText:
    """A judge whose reward model scores each answer by a fixed table."""

    def __init__(self, scores: dict[str, float], trusted: bool = True) -> None:
        self.scores, self.trusted = scores, trusted

    def read(self, generations: list[Generation]) -> object:
        return type("Reading", (), {"scores": torch.tensor([self.scores[g.text] for g in generations])})()


class Drawn:
    """A server whose batched samples are a given list (one n-subset, in a given order)."""

    def __init__(self, answers: list[Generation]) -> None:
        self.answers = answers

    def stream_samples(self, messages, n, version, sampling, should_stop=None):  # noqa: ANN001, ANN201
        assert n == len(self.answers)
        yield self.answers


@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_chances_are_how_often_best_answer_serves_each_answer(n: int) -> None:
    """The evaluation weighs each pooled answer by pick_chances; best_answer, handed every
    n-subset of the pool in every order, must serve each answer exactly that often (equal
    scores included), or the bench would measure something the app does not serve."""
    scores = {"a": 0.1, "b": 0.7, "c": 0.7, "d": -0.2, "e": 0.4}
    pool = [answer(t) for t in scores]
    served = dict.fromkeys(scores, 0)
    draws = 0
    for subset in itertools.permutations(pool, n):
        *_, pick = (
            best_answer(Drawn(list(subset)), ScoresByText(scores), [], SAMPLING, n) if n > 1 else (None, Pick(subset[0], 1))
        )
        served[pick.generation.text] += 1
        draws += 1
    chances = pick_chances([scores[g.text] for g in pool], n)
    assert [served[t] / draws for t in scores] == pytest.approx(chances)


class FakeRuntime:
    """What served_answers reads: a server that writes numbered answers, and a judge."""

    def __init__(self, best_of: int, trusted: bool) -> None:
        self.settings = type("S", (), {"selection": SelectionSettings(best_of=best_of)})()
        self.asked: list[tuple[int, str | None]] = []
        self.judge = ScoresByText({}, trusted)
        runtime = self

        class Server:
            def sampling(self, max_new_tokens: int) -> Sampling:
                return SAMPLING

            def generate_many(self, conversations, version, sampling):  # noqa: ANN001, ANN201
                runtime.asked.append((len(conversations), version))
                out = [answer(" ".join(["w"] * (1 + i % 7)), c[-1]["content"]) for i, c in enumerate(conversations)]
                runtime.judge.scores.update({g.text: -len(g.text) for g in out})  # the model likes short answers
                return out

        self.server = Server()


def test_served_answers_pool_n_samples_per_served_answer_while_the_model_is_trusted() -> None:
    def words(prompt: str, text: str) -> float:
        return -len(text.split())

    runtime = FakeRuntime(best_of=4, trusted=True)
    served = served_answers(runtime, words, ["p1", "p2"], per_prompt=2, max_new_tokens=8)  # type: ignore[arg-type]
    assert runtime.asked == [(16, None)]  # 2 prompts × 2 served answers × best-of-4, one batched call
    assert served["picked_from"] == [4] * 16
    for k in range(2):
        assert sum(served["weights"][k * 8 : (k + 1) * 8]) == pytest.approx(1.0)
    # the reward model's favourite (the shortest) carries the most weight
    first = served["weights"][:8]
    assert first.index(max(first)) == served["tokens"][:8].index(min(served["tokens"][:8]))

    untrusted = FakeRuntime(best_of=4, trusted=False)
    plain = served_answers(untrusted, words, ["p1", "p2"], per_prompt=2, max_new_tokens=8)  # type: ignore[arg-type]
    assert untrusted.asked == [(4, None)] and plain["picked_from"] == [1] * 4
    assert plain["weights"] == pytest.approx([0.5] * 4)


def test_evaluate_weighs_each_answer_by_its_chance_of_being_served() -> None:
    prompts = [[{"role": "user", "content": p}] for p in ("p1", "p1", "p2", "p2")]
    active = {"scores": [1.0, 0.0, 1.0, 1.0], "kl": [0.0] * 4, "tokens": [2, 4, 2, 2], "eos": [1.0] * 4, "texts": ["a"] * 4}
    base = {"scores": [0.5, 0.5], "tokens": [3, 3], "eos": [1.0, 1.0], "texts": ["b", "b"]}
    plain = evaluate(active, base, prompts, "v1", 0.0, 2, 1)
    assert plain["win_rate"] == pytest.approx(0.75)  # prompt 1: one win one loss; prompt 2: two wins
    weighted = evaluate({**active, "weights": [0.9, 0.1, 0.5, 0.5]}, base, prompts, "v1", 0.0, 2, 1)
    assert weighted["win_rate"] == pytest.approx((0.9 + 1.0) / 2)
    assert weighted["mean_tokens"] == pytest.approx((0.9 * 2 + 0.1 * 4 + 2) / 2)


def test_the_read_again_se_of_plain_answers_is_the_se_of_their_mean() -> None:
    from bench.learning_eval import resample_se

    wins = [[1.0, 0.0, 0.5, 1.0], [0.0, 0.0, 1.0, 0.5]]
    expected = sum(statistics.variance(w) / len(w) for w in wins) ** 0.5 / len(wins)
    assert resample_se(wins, [[0.0] * 4] * 2, 1) == pytest.approx(expected)
    assert resample_se(wins, [[0.0] * 4] * 2, 4) is None  # nothing left to leave one out of


def test_the_read_again_se_predicts_how_much_a_second_read_moves() -> None:
    """Many reads of the same served version (fixed prompts, fresh pools of answers): the
    spread of the best-of-4 win-rate across reads is what resample_se says from one read."""
    from bench.learning_eval import resample_se

    rng = random.Random(7)
    prevalence = [rng.uniform(0.1, 0.7) for _ in range(12)]

    def pool(p: float) -> tuple[list[float], list[float]]:
        wins = [1.0 if rng.random() < p else rng.choice((0.0, 0.5)) for _ in range(12)]
        return wins, [w + rng.gauss(0.0, 1.0) for w in wins]  # a noisy reward model

    reads, predicted = [], []
    for _ in range(150):
        pools = [pool(p) for p in prevalence]
        reads.append(statistics.fmean(expected_win(w, o, 4) for w, o in pools))
        predicted.append(resample_se([w for w, _ in pools], [o for _, o in pools], 4))
    ratio = statistics.fmean(predicted) / statistics.stdev(reads)
    assert 0.8 < ratio < 1.35, ratio  # the jackknife is slightly conservative for U-statistics

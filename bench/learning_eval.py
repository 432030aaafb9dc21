"""The learning benchmark's evaluation: what a visitor is served against the base, on
held-out prompts, judged by the rater (win-rate ± SE), and the policy's own samples (KL)."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.learning_votes import messages
from bench.raters import Rater
from rlhf_demo.config import PPOConfig
from rlhf_demo.modeling import LoadedModel
from rlhf_demo.modeling.adapters import put_adapter
from rlhf_demo.ppo.trainer import sample_and_score
from rlhf_demo.reward.model import RewardModel
from rlhf_demo.runtime import Runtime
from rlhf_demo.serving import BASE_VERSION

EVAL_ADAPTER = "bench_eval"


def sample_answers(
    loaded: LoadedModel,
    folder: str | Path | None,
    rater: Rater,
    prompts: list[list[dict[str, str]]],
    config: PPOConfig,
    batch: int,
) -> dict[str, list]:
    """Answers of the adapter in ``folder`` (None: the base) to ``prompts``, sampled as PPO
    and the gate sample (``sample_and_score``: the training temperature, no top-k/top-p),
    judged by the rater, with their KL to the reference (sum over the answer of
    log pi - log ref, the gate's and PPO's estimator)."""

    def rater_scores(
        batch_prompts: list, completions: list[str], finished: list[bool]
    ) -> torch.Tensor:  # the rater reads the text
        return torch.tensor([float(rater(p[-1]["content"], c)) for p, c in zip(batch_prompts, completions, strict=True)])

    adapter = None
    if folder is not None:
        loaded.model = put_adapter(loaded.model, EVAL_ADAPTER, folder)
        adapter = EVAL_ADAPTER
    answers = sample_and_score(loaded.model, loaded.tokenizer, adapter, prompts, rater_scores, config, batch)
    if adapter is not None and len(loaded.model.peft_config) > 1:
        loaded.model.delete_adapter(EVAL_ADAPTER)
    return {
        "texts": answers.texts,
        "scores": answers.scores,
        "kl": answers.kl,
        "tokens": answers.tokens,
        "eos": [float(e) for e in answers.eos],
    }


def served_answers(
    runtime: Runtime, rater: Rater, prompts: list[str], per_prompt: int, max_new_tokens: int, base: bool = False
) -> dict[str, list]:
    """What a visitor is served, as an exact expectation: chat answers of the served version
    with the server's sampling, read by the serving process's reward model (``Judge.read``)
    and picked as :func:`selection.best_answer` picks (its highest score of n samples, while
    the model is trusted; else one plain sample). Per prompt a pool of ``per_prompt`` × n
    samples is drawn in shared engine steps, and each answer is weighted by its chance of being
    the pick of n drawn from the pool (:func:`pick_chances`): the mean over all n-subsets, so
    no resampling noise, at the cost of the ``per_prompt`` × n samples that serving
    ``per_prompt`` answers would take. ``base``: plain samples of the base."""
    server, sampling = runtime.server, runtime.server.sampling(max_new_tokens=max_new_tokens)
    best_of = runtime.settings.selection.best_of or 1  # the Runtime filled in the device's
    n = 1 if base or best_of <= 1 or not runtime.judge.trusted else best_of
    pool = per_prompt * n
    asked = [messages(p) for p in prompts for _ in range(pool)]
    generations = server.generate_many(asked, BASE_VERSION if base else None, sampling)
    weights: list[float] = []
    orders: list[float] = []  # what the pick is by: the reward model's scores (all 0 when n = 1)
    for k in range(len(prompts)):
        answers = generations[k * pool : (k + 1) * pool]
        order = runtime.judge.read(answers).scores.tolist() if n > 1 else [0.0] * pool
        weights += pick_chances(order, n)
        orders += order
    texts = [g.text for g in generations]
    return {
        "texts": texts,
        "scores": [float(rater(m[-1]["content"], t)) for m, t in zip(asked, texts, strict=True)],
        "weights": weights,  # each answer's chance of being served; they sum to 1 per prompt
        "order": orders,
        "kl": [0.0] * len(generations),  # the policy's KL is measured on its own samples (sample_answers)
        "tokens": [g.completion_tokens for g in generations],
        "eos": [float(g.finish_reason == "stop") for g in generations],
        "picked_from": [n] * len(generations),
        "generations": generations,
    }


def pick_chances(order_scores: list[float], n: int) -> list[float]:
    """For each answer, the share of its n-subsets (of all m answers) whose highest
    ``order_scores`` it is: C(rank, n-1) / C(m, n), rank = answers scored below it. Equal
    scores share their chances evenly (a tie among them is broken at random)."""
    m = len(order_scores)
    if not 1 <= n <= m:
        raise ValueError(f"n must be in 1..{m}, got {n}")
    ranked = sorted(range(m), key=lambda i: order_scores[i])
    by_rank = [math.comb(r, n - 1) / math.comb(m, n) for r in range(m)]
    chances = [0.0] * m
    start = 0
    while start < m:  # runs of equal scores share the chances of the ranks they span
        end = start
        while end + 1 < m and order_scores[ranked[end + 1]] == order_scores[ranked[start]]:
            end += 1
        share = sum(by_rank[start : end + 1]) / (end - start + 1)
        for r in range(start, end + 1):
            chances[ranked[r]] = share
        start = end + 1
    return chances


def expected_win(wins: list[float], order_scores: list[float], n: int) -> float:
    """Expected win of the answer that ``order_scores`` picks among n random answers of m."""
    return sum(w * c for w, c in zip(wins, pick_chances(order_scores, n), strict=True))


def resample_se(wins: list[list[float]], orders: list[list[float]], n: int) -> float | None:
    """The standard error of the win-rate from the served answers' sampling alone, the held-out
    prompts and the base's answers fixed: two reads of one version differ by about √2 × this
    (the figure's own SE, over prompts, is mostly which prompts were drawn, and that is the
    same in every read). Per prompt, the jackknife over its pooled answers of the best-of-n
    expectation (a U-statistic: leave one answer out, recompute over the rest); summed over
    prompts. None when a prompt has too few answers to leave one out."""
    if any(len(w) <= n for w in wins):
        return None
    variance = 0.0
    for w, o in zip(wins, orders, strict=True):
        m = len(w)
        left_out = [expected_win(w[:i] + w[i + 1 :], o[:i] + o[i + 1 :], n) for i in range(m)]
        centre = statistics.fmean(left_out)
        variance += (m - 1) / m * sum((x - centre) ** 2 for x in left_out)
    return math.sqrt(variance) / len(wins)


def feature_gap(runtime: Runtime, worker: LoadedModel, folder: Path, generations: list) -> float | None:
    """Largest |difference| between the answer features the serving process reads (its own
    base, ``Judge``) and the worker's (the base the ensemble was fitted on), relative to the
    features' scale: the ensemble must mean the same on both sides."""
    if not folder.is_dir() or not generations:
        return None
    served = runtime.judge.read(generations).features
    rm = RewardModel.load(worker.model, worker.tokenizer, folder)
    fitted = rm.features(
        [g.prompt for g in generations], [g.text for g in generations], [g.finish_reason == "stop" for g in generations]
    )
    return float((served - fitted).abs().max() / fitted.abs().max().clamp(min=1e-6))


def verdict(score: float, against: float) -> float:
    """The rater's verdict on one comparison: a win, a loss, or a tie (1/2)."""
    return 1.0 if score > against else 0.0 if score < against else 0.5


def win_rate(wins: list[float], group_size: int) -> tuple[float, float]:
    """Mean and standard error of the win-rate; answers to the same prompt are not
    independent, so the SE is over per-prompt means (``group_size`` answers each)."""
    groups = [statistics.fmean(wins[i : i + group_size]) for i in range(0, len(wins), group_size)]
    se = statistics.stdev(groups) / len(groups) ** 0.5 if len(groups) > 1 else float("nan")
    return statistics.fmean(wins), se


def evaluate(
    active: dict[str, list],
    base: dict[str, list],
    prompts: list[list[dict[str, str]]],
    version: str,
    seconds: float,
    group_size: int,
    base_group: int,
) -> dict[str, Any]:
    """Rater verdicts, served version vs base, on the same held-out prompts: each of the
    ``group_size`` served answers to a prompt is judged against each of the prompt's
    ``base_group`` base answers (ties 1/2), so the base's own sampling noise averages out.
    ``active["weights"]`` (optional): each answer's chance of being the one served, summing
    to 1 per prompt (best-of-n, :func:`served_answers`); without them every answer counts
    alike. Means are over prompts of the weighted per-prompt figures."""
    verdicts = [
        [verdict(a, b) for b in base["scores"][(i // group_size) * base_group : (i // group_size + 1) * base_group]]
        for i, a in enumerate(active["scores"])
    ]
    weights = active.get("weights") or [1.0 / group_size] * len(verdicts)

    def per_prompt(values: list[float]) -> list[float]:  # each prompt's weighted mean
        return [
            sum(w * v for w, v in zip(weights[i : i + group_size], values[i : i + group_size], strict=True))
            for i in range(0, len(values), group_size)
        ]

    def served_mean(values: list[float]) -> float:  # the weighted per-prompt means, averaged over prompts
        return statistics.fmean(per_prompt(values))

    answer_wins = [statistics.fmean(v) for v in verdicts]  # each answer against the prompt's base answers
    rate, se = win_rate(per_prompt(answer_wins), 1)
    n = int(active["picked_from"][0]) if active.get("order") else 1
    orders = active.get("order") or [0.0] * len(verdicts)
    read_se = resample_se(
        [answer_wins[i : i + group_size] for i in range(0, len(verdicts), group_size)],
        [orders[i : i + group_size] for i in range(0, len(verdicts), group_size)],
        n,
    )
    step = max(1, len(prompts) // 6)
    examples = [
        {"prompt": prompts[i][-1]["content"], "active": active["texts"][i], "base": base["texts"][(i // group_size) * base_group]}
        for i in range(0, len(prompts), step)
    ][:6]
    flat = [w for v in verdicts for w in v]
    return {
        "active_version": version,
        "win_rate": rate,
        "win_rate_se": se,
        "read_se": read_se,
        "comparisons": len(flat),
        "answers": len(verdicts),
        "base_answers_per_prompt": base_group,
        "wins": sum(w == 1.0 for w in flat),
        "ties": sum(w == 0.5 for w in flat),
        "mean_score": served_mean(active["scores"]),
        "base_mean_score": statistics.fmean(base["scores"]),
        "kl": statistics.fmean(active["kl"]),
        "kl_max": max(active["kl"]),
        "mean_tokens": served_mean(active["tokens"]),
        "base_mean_tokens": statistics.fmean(base["tokens"]),
        "eos_rate": served_mean(active["eos"]),
        "base_eos_rate": statistics.fmean(base["eos"]),
        "examples": examples,
        "seconds": seconds,
    }


def rm_agreement(
    loaded: LoadedModel,
    folder: Path,
    prompts: list[list[dict[str, str]]],
    active: dict[str, list],
    base: dict[str, list],
    group_size: int,
    base_group: int,
) -> dict[str, Any]:
    """How often the cycle's reward model orders the held-out (served, base) answer pairs as
    the rater does (pairs the rater calls a tie are skipped). A second, larger accuracy
    figure next to the library's own held-out split (15 % of the voted prompts)."""
    pairs = [
        (i, j)
        for i in range(len(active["scores"]))
        for j in range((i // group_size) * base_group, (i // group_size + 1) * base_group)
        if active["scores"][i] != base["scores"][j]
    ]
    if not pairs or not folder.is_dir():
        return {"rm_eval_accuracy": None, "rm_eval_pairs": 0}
    rm = RewardModel.load(loaded.model, loaded.tokenizer, folder)
    base_prompts = [prompts[(j // base_group) * group_size] for j in range(len(base["texts"]))]
    r_active = rm.score(prompts, active["texts"], normalized=False, batch_size=16, finished=[bool(e) for e in active["eos"]])
    r_base = rm.score(base_prompts, base["texts"], normalized=False, batch_size=16, finished=[bool(e) for e in base["eos"]])
    agree = [
        ((float(r_active[i]) > float(r_base[j])) == (active["scores"][i] > base["scores"][j]))
        if float(r_active[i]) != float(r_base[j])
        else 0.5
        for i, j in pairs
    ]
    return {"rm_eval_accuracy": statistics.fmean(float(a) for a in agree), "rm_eval_pairs": len(pairs)}


@dataclass
class Evaluator:
    """Judges the served version after each cycle against the base's answers, which are
    sampled once (:meth:`sample_base`): the base never changes, so every cycle is judged
    against the same answers."""

    runtime: Runtime
    worker: LoadedModel
    rater: Rater
    heldout: list[str]
    sampler: PPOConfig
    eval_samples: int
    served_samples: int
    base_samples: int
    eval_batch: int
    base_answers: dict[str, list] = field(default_factory=dict)
    served_base: dict[str, list] = field(default_factory=dict)

    @property
    def eval_prompts(self) -> list[list[dict[str, str]]]:
        return [messages(p) for p in self.heldout for _ in range(self.eval_samples)]

    def sample_base(self) -> float:
        """The base's held-out answers, from the worker (policy figures) and through the
        server (the headline); returns the seconds it took."""
        started = time.perf_counter()
        base_prompts = [messages(p) for p in self.heldout for _ in range(self.base_samples)]
        self.base_answers = sample_answers(self.worker, None, self.rater, base_prompts, self.sampler, self.eval_batch)
        self.served_base = served_answers(
            self.runtime, self.rater, self.heldout, self.base_samples, self.sampler.max_new_tokens, base=True
        )
        return time.perf_counter() - started

    def __call__(self, reward_folder: Path | None = None) -> dict[str, Any]:
        """The headline: what a visitor is served (best-of-n included) against the base, both
        through the server; beside it the policy's own samples (its KL, and the win-rate of
        earlier stops, judged against the worker's base samples)."""
        started = time.perf_counter()
        runtime, eval_prompts = self.runtime, self.eval_prompts
        version = runtime.store.active_version() or "v0"
        path = runtime.store.get_version(version)["path"]
        answers = sample_answers(self.worker, path, self.rater, eval_prompts, self.sampler, self.eval_batch)
        policy = evaluate(
            answers, self.base_answers, eval_prompts, version, time.perf_counter() - started, self.eval_samples, self.base_samples
        )
        served = served_answers(runtime, self.rater, self.heldout, self.served_samples, self.sampler.max_new_tokens)
        pool = len(served["texts"]) // len(self.heldout)  # served_samples × n
        served_prompts = [messages(p) for p in self.heldout for _ in range(pool)]
        result = evaluate(
            served, self.served_base, served_prompts, version, time.perf_counter() - started, pool, self.base_samples
        )
        result.update(kl=policy["kl"], kl_max=policy["kl_max"], picked_from=served["picked_from"][0])
        result["policy"] = {
            k: policy[k] for k in ("win_rate", "win_rate_se", "comparisons", "mean_score", "mean_tokens", "eos_rate")
        }
        if reward_folder is not None:
            result.update(
                rm_agreement(
                    self.worker, reward_folder, eval_prompts, answers, self.base_answers, self.eval_samples, self.base_samples
                )
            )
            result["feature_gap"] = feature_gap(runtime, self.worker, reward_folder, served["generations"][:8])
        return result

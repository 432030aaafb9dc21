"""Learning benchmark: does the real loop (votes → reward model → PPO → gate) learn a rater?

A simulated rater (``module:function``, ``rate(prompt, response) -> float``, higher is
better) votes on answers of the currently served policy, through the app's own code path:
``selection.compare_round`` chooses the Compare pair as the Compare tab does (the library's
``SelectionSettings``: double Thompson sampling over the reward ensemble among ``candidates``
samples, or ``passive`` two samples), ``FeedbackStore.log_response`` records both, and the
rater's scores become an A/B vote (``prefer``: the higher score wins, equal is a tie) and
👍/👎 (``rate``: above the running median of all scores so far is 👍). Between vote rounds,
``run_cycle`` (reward model, PPO, gate, publish/reject) trains the next version in a separate
base model, as the worker process would, and the server switches to what the registry serves.

After each cycle (and once before the first), what a visitor is served is compared with the
base on held-out prompts that are never voted on nor used for PPO: ``--served-samples`` chat
answers per prompt through ``selection.best_answer`` (best-of-n as configured) against
``--base-samples`` plain samples of the base, both from the serving process, judged by the
rater (ties ½). Beside it, the policy's own samples (the PPO sampler) give its KL to the
reference and the win-rate earlier stops reported. Per cycle: votes, the decisive share of
A/B votes, reward-model accuracy, the gate decision, win-rates, KL, wall time and peak RSS;
writes ``<out>/learning.json`` and ``<out>/learning.png``. ``--seeds 0,1,2`` runs one process
per seed and summarises them as mean ± SE (``<out>/summary.json``; ``--record``:
``bench/results/learning-<rater>.json``).

    python bench/learning.py --rater bench.raters:brevity --votes 200 --cycles 3 --seeds 0,1,2 --record --out bench/out/brevity
    python bench/learning.py --quick --out bench/out/quick     # tiny model, smoke run under a minute

Results and the reasoning behind the defaults: docs/learning.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.learning_summary import record_path, summarize  # noqa: E402
from bench.raters import Rater, load_rater  # noqa: E402
from rlhf_demo.config import (  # noqa: E402
    DEFAULT_MODEL,
    SELECTION_RULES,
    TINY_MODEL,
    GateConfig,
    PPOConfig,
    SelectionSettings,
    Settings,
    TrainingSettings,
    load_settings,
)
from rlhf_demo.modeling import LoadedModel, load_model  # noqa: E402
from rlhf_demo.modeling.adapters import put_adapter  # noqa: E402
from rlhf_demo.ppo.trainer import sample_and_score  # noqa: E402
from rlhf_demo.reward.model import RewardModel  # noqa: E402
from rlhf_demo.runtime import Runtime  # noqa: E402
from rlhf_demo.selection import Pick, Round, best_answer, compare_round  # noqa: E402
from rlhf_demo.serving import BASE_VERSION  # noqa: E402
from rlhf_demo.worker.cycle import run_cycle  # noqa: E402

log = logging.getLogger("bench.learning")
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
SESSIONS = 16  # the rater stands for a crowd: votes rotate over this many session ids
EVAL_ADAPTER = "bench_eval"


# ── inputs ───────────────────────────────────────────────────────────────────────────


def load_prompts(folder: Path = PROMPTS_DIR) -> list[str]:
    """Every ``*.txt`` (one prompt a line, ``#`` comments) and ``*.json`` (a list of strings)
    in the folder, de-duplicated, in file order."""
    prompts: list[str] = []
    for path in sorted(folder.iterdir()):
        if path.suffix == ".txt":
            prompts += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        elif path.suffix == ".json":
            prompts += [str(p).strip() for p in json.loads(path.read_text())]
    return list(dict.fromkeys(p for p in prompts if p))


def split_heldout(prompts: list[str], count: int) -> tuple[list[str], list[str]]:
    """``(train, held_out)``: the ``count`` prompts with the smallest sha256 are held out.

    Depends on the text alone (not on the seed), so every run is judged on the same
    prompts, and adding prompts moves few of them."""
    ranked = sorted(prompts, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    held = set(ranked[:count])
    return [p for p in prompts if p not in held], [p for p in prompts if p in held]


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ── the simulated rater votes through the serving path ──────────────────────────────


def prompt_stream(prompts: list[str], rng: random.Random) -> Iterator[str]:
    """Training prompts in shuffled rounds: every prompt once before any repeats."""
    while True:
        order = list(prompts)
        rng.shuffle(order)
        yield from order


def cast_votes(
    runtime: Runtime,
    rater: Rater,
    prompts: Iterator[str],
    budget: int,
    seen_scores: list[float],
    thumbs_per_pair: int,
    max_new_tokens: int,
    rng: random.Random,
) -> dict[str, Any]:
    """Spend ``budget`` votes on answers of the served version; returns what was cast.

    Each prompt gets a Compare round of the active version, chosen as the app chooses it
    (``selection.compare_round``: the library's selection settings), both answers logged;
    one A/B vote on the pair, then up to ``thumbs_per_pair`` thumbs on its answers (👍 when
    the score is above the running median of all scores so far).
    """
    server, store = runtime.server, runtime.store
    cast: dict[str, Any] = {
        "ab": 0,
        "ties": 0,
        "thumbs_up": 0,
        "thumbs_down": 0,
        "pairs": 0,
        "answer_tokens": [],
        "scores": [],
        "rules": {},
    }
    started = time.perf_counter()

    def votes() -> int:
        return cast["ab"] + cast["ties"] + cast["thumbs_up"] + cast["thumbs_down"]

    while votes() < budget:
        prompt = next(prompts)
        session = f"bench-rater-{cast['pairs'] % SESSIONS}"  # under the per-session vote cap
        *_, round_ = compare_round(
            server,
            runtime.judge,
            messages(prompt),
            server.sampling(max_new_tokens=max_new_tokens),
            runtime.settings.selection,
            rng,
        )
        assert isinstance(round_, Round)
        pair = round_.pair
        cast["rules"][round_.rule] = cast["rules"].get(round_.rule, 0) + 1
        ids = [
            store.log_response(
                visitor_id=session,
                prompt=g.prompt,
                text=g.text,
                adapter_version=g.version,
                sampling=dataclasses.asdict(g.sampling),
                prompt_tokens=g.prompt_tokens,
                completion_tokens=g.completion_tokens,
                latency_s=g.latency_s,
                finish_reason=g.finish_reason,
            )
            for g in pair
        ]
        scores = [float(rater(prompt, g.text)) for g in pair]
        seen_scores.extend(scores)
        cast["pairs"] += 1
        cast["answer_tokens"] += [g.completion_tokens for g in pair]
        cast["scores"] += scores
        outcome = "A" if scores[0] > scores[1] else "B" if scores[1] > scores[0] else "tie"
        store.prefer(visitor_id=session, response_a_id=ids[0], response_b_id=ids[1], outcome=outcome, source="two_samples")
        cast["ab" if outcome != "tie" else "ties"] += 1  # a tie is a vote too, but teaches the RM nothing
        median = statistics.median(seen_scores)
        order = [0, 1] if rng.random() < 0.5 else [1, 0]
        for i in order[:thumbs_per_pair]:
            if votes() >= budget:
                break
            up = scores[i] > median
            store.rate(session, ids[i], 1 if up else -1)
            cast["thumbs_up" if up else "thumbs_down"] += 1
    cast["votes"] = votes()
    cast["decisive_fraction"] = cast["ab"] / max(1, cast["ab"] + cast["ties"])
    cast["seconds"] = time.perf_counter() - started
    cast["mean_answer_tokens"] = statistics.fmean(cast.pop("answer_tokens"))
    cast["mean_score"] = statistics.fmean(cast.pop("scores"))
    return cast


# ── evaluation: served version vs base on held-out prompts ──────────────────────────


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
    """What a visitor is served: ``per_prompt`` chat answers per prompt through the app's own
    path (``selection.best_answer``: the served version, best-of-n as configured), many at a
    time so the engine decodes them in shared steps; ``base``: plain samples of the base."""
    server, sampling = runtime.server, runtime.server.sampling(max_new_tokens=max_new_tokens)
    asked = [messages(p) for p in prompts for _ in range(per_prompt)]
    if base:
        picks = [Pick(g, 1) for g in server.generate_many(asked, BASE_VERSION, sampling)]
    else:

        def serve(conversation: list[dict[str, str]]) -> Pick:
            *_, pick = best_answer(server, runtime.judge, conversation, sampling, runtime.settings.selection.best_of)
            return pick

        with ThreadPoolExecutor(max_workers=16) as pool:
            picks = list(pool.map(serve, asked))
    texts = [p.generation.text for p in picks]
    return {
        "texts": texts,
        "scores": [float(rater(m[-1]["content"], t)) for m, t in zip(asked, texts, strict=True)],
        "kl": [0.0] * len(picks),  # the policy's KL is measured on its own samples (sample_answers)
        "tokens": [p.generation.completion_tokens for p in picks],
        "eos": [float(p.generation.finish_reason == "stop") for p in picks],
        "picked_from": [p.picked_from for p in picks],
        "generations": [p.generation for p in picks],
    }


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
    ``base_group`` base answers (ties 1/2), so the base's own sampling noise averages out."""
    verdicts = [
        [
            1.0 if a > b else 0.0 if a < b else 0.5
            for b in base["scores"][(i // group_size) * base_group : (i // group_size + 1) * base_group]
        ]
        for i, a in enumerate(active["scores"])
    ]
    rate, se = win_rate([statistics.fmean(v) for v in verdicts], group_size)
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
        "comparisons": len(flat),
        "answers": len(verdicts),
        "base_answers_per_prompt": base_group,
        "wins": sum(w == 1.0 for w in flat),
        "ties": sum(w == 0.5 for w in flat),
        "mean_score": statistics.fmean(active["scores"]),
        "base_mean_score": statistics.fmean(base["scores"]),
        "kl": statistics.fmean(active["kl"]),
        "kl_max": max(active["kl"]),
        "mean_tokens": statistics.fmean(active["tokens"]),
        "base_mean_tokens": statistics.fmean(base["tokens"]),
        "eos_rate": statistics.fmean(active["eos"]),
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


# ── the benchmark ────────────────────────────────────────────────────────────────────


def ppo_curve(runtime: Runtime) -> list[dict[str, float]]:
    """Per-step PPO metrics of the latest run, from the store."""
    run = runtime.store.list_runs(limit=1)[0]
    steps: dict[int, dict[str, float]] = {}
    for m in runtime.store.run_metrics(run["id"]):
        if m["phase"] == "ppo" and m["name"] in (
            "score",
            "kl",
            "kl_coef",
            "response_length",
            "has_eos",
            "time_s",
            "approx_kl",
            "clipfrac",
        ):
            steps.setdefault(m["step"], {})[m["name"]] = m["value"]
    return [steps[k] for k in sorted(steps)]


class PhaseTimer:
    """The ``report`` callback of ``run_cycle``: seconds spent in each phase."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.phase, self.at = "", time.perf_counter()

    def __call__(self, **changes: Any) -> None:
        if "phase" in changes and changes["phase"] != self.phase:
            self.stop()
            self.phase = changes["phase"]

    def stop(self) -> dict[str, float]:
        now = time.perf_counter()
        if self.phase:
            self.phases[self.phase] = self.phases.get(self.phase, 0.0) + now - self.at
        self.at = now
        return self.phases


def spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal integers (earlier parts get the remainder)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def make_settings(args: argparse.Namespace, data_dir: Path) -> Settings:
    """The library's settings, with only what the command line names changed: the benchmark
    measures the defaults that the live worker runs."""
    training = TrainingSettings(min_votes=1)
    changes = {
        "ppo": {
            "steps": args.ppo_iterations,
            "batch_size": args.ppo_batch_size,
            "samples_per_prompt": args.samples_per_prompt,
            "mini_batch_size": args.mini_batch_size,
            "ppo_epochs": args.ppo_epochs,
            "advantage": args.advantage,
            "max_new_tokens": args.max_new_tokens,
            "learning_rate": args.ppo_lr,
            "init_kl_coef": args.kl_coef,
            "kl_loss_coef": args.kl_loss_coef,
        },
        "reward": {"l2": args.rm_l2, "layer": args.rm_layer},
        "gate": {"prompts": args.gate_prompts, "samples_per_prompt": args.gate_samples, "confidence": args.gate_confidence},
    }
    parts = {
        name: dataclasses.replace(getattr(training, name), **{k: v for k, v in fields.items() if v is not None})
        for name, fields in changes.items()
    }
    if args.cycle_budget is not None:
        parts["time_budget_s"] = args.cycle_budget
    if args.restart_rejected:
        parts["resume_rejected"] = False
    training = dataclasses.replace(training, **parts)
    chosen = {
        "rule": args.selection,
        "candidates": args.candidates,
        "candidate_temperature": args.candidate_temperature,
        "best_of": args.best_of,
    }
    selection = dataclasses.replace(SelectionSettings(), **{k: v for k, v in chosen.items() if v is not None})
    return load_settings(
        model=args.model, data_dir=data_dir, quantization=args.quantization, training=training, selection=selection
    )


def gate_config(args: argparse.Namespace) -> GateConfig | None:
    if args.gate == "off":  # measurement only: everything is published
        return GateConfig(min_improvement=float("-inf"), max_kl=float("inf"), max_degenerate_fraction=1.0)
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    shutil.rmtree(data_dir, ignore_errors=True)  # a fresh SQLite and registry every run

    rater = load_rater(args.rater)
    train_prompts, heldout = split_heldout(load_prompts(Path(args.prompts)), args.heldout)
    log.info("%d training prompts, %d held out", len(train_prompts), len(heldout))

    # Two bases, as in the app: the serving process's and the worker's. The converted model
    # lives in --models-from (converted there once), the run's own data dir stays fresh.
    model_settings = load_settings(model=args.model, data_dir=args.models_from, quantization=args.quantization)
    settings = make_settings(args, data_dir)
    runtime = Runtime(settings, load_model(model_settings))
    worker = load_model(model_settings)
    log.info("model: %s", worker.describe())
    setup_s = time.perf_counter() - t0

    # Held-out answers of the base are sampled once: the base never changes, and every
    # cycle is then judged against the same answers. v0 is the identity LoRA (B = 0).
    eval_prompts = [messages(p) for p in heldout for _ in range(args.eval_samples)]
    base_prompts = [messages(p) for p in heldout for _ in range(args.base_samples)]
    sampler = settings.training.ppo
    started = time.perf_counter()
    base_answers = sample_answers(worker, None, rater, base_prompts, sampler, args.eval_batch)
    served_prompts = [messages(p) for p in heldout for _ in range(args.served_samples)]
    served_base = served_answers(runtime, rater, heldout, args.base_samples, sampler.max_new_tokens, base=True)
    base_s = time.perf_counter() - started

    def evaluation(reward_folder: Path | None = None) -> dict[str, Any]:
        """The headline: what a visitor is served (best-of-n included) against the base, both
        through the server; beside it the policy's own samples (its KL, and the win-rate of
        earlier stops, judged against the worker's base samples)."""
        started = time.perf_counter()
        version = runtime.store.active_version() or "v0"
        path = runtime.store.get_version(version)["path"]
        answers = sample_answers(worker, path, rater, eval_prompts, sampler, args.eval_batch)
        policy = evaluate(
            answers, base_answers, eval_prompts, version, time.perf_counter() - started, args.eval_samples, args.base_samples
        )
        served = served_answers(runtime, rater, heldout, args.served_samples, sampler.max_new_tokens)
        result = evaluate(
            served, served_base, served_prompts, version, time.perf_counter() - started, args.served_samples, args.base_samples
        )
        result.update(kl=policy["kl"], kl_max=policy["kl_max"], picked_from=statistics.fmean(served["picked_from"]))
        result["policy"] = {
            k: policy[k] for k in ("win_rate", "win_rate_se", "comparisons", "mean_score", "mean_tokens", "eos_rate")
        }
        if reward_folder is not None:
            result.update(
                rm_agreement(worker, reward_folder, eval_prompts, answers, base_answers, args.eval_samples, args.base_samples)
            )
            result["feature_gap"] = feature_gap(runtime, worker, reward_folder, served["generations"][:8])
        return result

    rows: list[dict[str, Any]] = []
    base_eval = evaluation()
    base_eval["base_sampling_seconds"] = base_s
    rows.append(
        {
            "cycle": 0,
            "votes": 0,
            "decision": "base",
            "eval": base_eval,
            "elapsed_s": time.perf_counter() - t0,
            "peak_rss_mb": peak_rss_mb(),
        }
    )
    result = write(out, args, rows, setup_s, t0, settings)
    log.info(
        "cycle 0 (before training): win-rate %.2f, score %.2f, %.1f s",
        base_eval["win_rate"],
        base_eval["mean_score"],
        base_eval["seconds"],
    )

    prompts = prompt_stream(train_prompts, rng)
    seen_scores: list[float] = []
    total_votes = 0
    for cycle, budget in enumerate(spread(args.votes, args.cycles), start=1):
        started = time.perf_counter()
        cast = cast_votes(runtime, rater, prompts, budget, seen_scores, args.thumbs_per_pair, sampler.max_new_tokens, rng)
        total_votes += cast["votes"]
        timer = PhaseTimer()

        summary = run_cycle(settings, runtime.store, worker, report=timer, gate_config=gate_config(args))
        phases = timer.stop()
        for p in worker.model.parameters():
            p.requires_grad_(False)
        served = runtime.sync_registry()
        cycle_s = time.perf_counter() - started
        run_id = runtime.store.list_runs(limit=1)[0]["id"]
        ev = evaluation(settings.data_dir / "reward" / f"run-{run_id}")
        rm = summary["reward"]
        row = {
            "cycle": cycle,
            "votes": total_votes,
            "cast": cast,
            "decisive_fraction": cast["decisive_fraction"],
            "votes_used": rm.get("votes_used"),
            "rm_accuracy": rm.get("agreement"),
            "rm_thumb_accuracy": rm.get("thumb_accuracy"),
            "rm_agreement": rm.get("agreement"),
            "rm_agreement_lower_bound": rm.get("agreement_lower_bound"),
            "rm_judged": rm.get("judged"),
            "rm_pairs": rm.get("pairs"),
            "rm_thumbs": rm.get("thumbs"),
            "decision": summary["decision"],
            "version": summary["version"],
            "trained_from": summary.get("trained_from"),
            "served": served,
            "gate": summary["gate"],
            "ppo": ppo_curve(runtime),
            "phase_seconds": phases,
            "cycle_seconds": cycle_s,
            "eval": ev,
            "elapsed_s": time.perf_counter() - t0,
            "peak_rss_mb": peak_rss_mb(),
        }
        rows.append(row)
        log.info(
            "cycle %d: %d votes, RM acc %s, %s %s (%s), win-rate %.2f, score %.2f, KL %.2f, %.0f s, peak RSS %.0f MB",
            cycle,
            total_votes,
            row["rm_accuracy"],
            row["decision"],
            row["version"],
            "; ".join(summary["gate"]["reasons"]) or "gate passed",
            ev["win_rate"],
            ev["mean_score"],
            ev["kl"],
            row["elapsed_s"],
            row["peak_rss_mb"],
        )
        result = write(out, args, rows, setup_s, t0, settings)
    runtime.close()
    return result


# ── output ───────────────────────────────────────────────────────────────────────────


def device_name() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def command_line() -> str:
    return "python bench/learning.py " + " ".join(sys.argv[1:])


def record(runs: dict[int, dict[str, Any]], args: argparse.Namespace, command: str) -> Path:
    """The small committed summary (mean ± SE over the seeds): ``bench/results/learning-<rater>[-cuda].json``."""
    summary = summarize(runs, args.rater, command, device_name(), torch.get_num_threads())
    path = record_path(args.rater, device_name())
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return path


def write(
    out: Path, args: argparse.Namespace, rows: list[dict[str, Any]], setup_s: float, t0: float, settings: Settings
) -> dict[str, Any]:
    last = rows[-1]
    elapsed = time.perf_counter() - t0
    eval_s = rows[0]["eval"].get("base_sampling_seconds", 0.0) + sum(r["eval"]["seconds"] for r in rows)
    final = {
        "win_rate": last["eval"]["win_rate"],
        "win_rate_se": last["eval"]["win_rate_se"],
        "comparisons": last["eval"]["comparisons"],
        "rm_accuracy": last.get("rm_accuracy"),
        "kl": last["eval"]["kl"],
        "votes": last["votes"],
        "elapsed_s": elapsed,
        "wall_s": elapsed - setup_s - eval_s,  # the loop itself: votes and cycles
        "eval_s": eval_s,
        "peak_rss_mb": peak_rss_mb(),
    }
    result = {
        "command": command_line(),
        "seed": args.seed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": f"{device_name()}, torch threads {torch.get_num_threads()}, {os.cpu_count()} cores",
        "selection": dataclasses.asdict(settings.selection),
        "setup_s": setup_s,
        "final": final,
        "cycles": rows,
    }
    (out / "learning.json").write_text(json.dumps(result, indent=2, default=str))
    if args.record:  # after every cycle: a run cut short still leaves its figures so far
        record({args.seed: result}, args, result["command"])
    plot(out / "learning.png", rows, args)
    print_table(rows)
    return result


def print_table(rows: list[dict[str, Any]]) -> None:
    def f(x: Any, fmt: str = ".2f") -> str:
        return "-" if x is None else format(x, fmt)

    print(
        f"{'cycle':>5} {'votes':>5} {'used':>5} {'RM acc':>7} {'RM eval':>7} {'gate':>9} {'score':>7} {'base':>7} "
        f"{'KL':>6} {'win':>5} {'tokens':>6} {'EOS':>5} {'time s':>7} {'RSS MB':>7}  win SE"
    )
    for r in rows:
        ev = r["eval"]
        print(
            f"{r['cycle']:>5} {r['votes']:>5} {f(r.get('votes_used'), 'd'):>5} {f(r.get('rm_accuracy')):>7} {f(ev.get('rm_eval_accuracy')):>7} "
            f"{r['decision']:>9} {ev['mean_score']:>7.2f} {ev['base_mean_score']:>7.2f} {ev['kl']:>6.2f} {ev['win_rate']:>5.2f} "
            f"{ev['mean_tokens']:>6.1f} {ev['eos_rate']:>5.2f} {r['elapsed_s']:>7.0f} {r['peak_rss_mb']:>7.0f}  ±{ev['win_rate_se']:.2f}"
        )
    sys.stdout.flush()


def plot(path: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["cycle"] for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    panels = [
        ("win-rate vs base (held-out)", [r["eval"]["win_rate"] for r in rows], 0.8),
        ("reward model accuracy", [r.get("rm_accuracy") for r in rows], 0.85),
        ("KL to reference (nats / answer)", [r["eval"]["kl"] for r in rows], 6.0),
        ("mean rater score", [r["eval"]["mean_score"] for r in rows], None),
        ("mean answer length (tokens)", [r["eval"]["mean_tokens"] for r in rows], None),
    ]
    for ax, (title, ys, target) in zip(axes.flat, panels, strict=False):
        pts = [(a, b) for a, b in zip(x, ys, strict=True) if b is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o")
        if title == "reward model accuracy":
            ax.plot(x, [r["eval"].get("rm_eval_accuracy") for r in rows], marker="s", linestyle="--", label="on eval pairs")
            ax.set_ylim(0, 1.05)
            ax.legend(["library held-out split", "held-out rater pairs"], fontsize=7)
        if title == "mean rater score":
            ax.plot(x, [r["eval"]["base_mean_score"] for r in rows], marker="x", linestyle="--", label="base")
            ax.legend()
        if target is not None:
            ax.axhline(target, color="grey", linestyle=":", label="target")
        for r in rows:
            if r["decision"] == "rejected":
                ax.axvline(r["cycle"], color="red", alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("cycle")
        ax.set_xticks(x)
    ax = axes.flat[5]
    for r in rows[1:]:
        steps = r["ppo"]
        ax.plot([s.get("score") for s in steps], label=f"cycle {r['cycle']}")
    ax.set_title("PPO: mean normalized RM score per step")
    ax.set_xlabel("PPO step")
    if len(rows) > 1:
        ax.legend(fontsize=7)
    fig.suptitle(f"{args.rater}, {rows[-1]['votes']} votes, {args.model} (red: gate rejected)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rater", default="bench.raters:brevity", help="module:function, rate(prompt, response) -> float")
    p.add_argument("--votes", type=int, default=200, help="total vote budget, spread evenly over the cycles")
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--out", default="bench/out/learning")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--models-from",
        "--data-dir",
        dest="models_from",
        default="data",
        help="data dir holding (or receiving) the converted model",
    )
    p.add_argument("--quantization", default=None, help="default: fp32 on a CPU (docs/precision.md), nf4 on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds", help="comma-separated seeds (e.g. 0,1,2): one run each, in parallel where cores allow, summarised as mean ± SE"
    )
    p.add_argument("--parallel", type=int, default=0, help="seeds run at once; 0: cores / threads")
    p.add_argument("--threads", type=int, default=2, help="torch threads; 0: torch's choice")
    p.add_argument("--prompts", default=str(PROMPTS_DIR), help="a folder of *.txt (one prompt a line) and *.json files")
    p.add_argument("--heldout", type=int, default=36, help="held-out prompts for the win-rate")
    p.add_argument(
        "--eval-samples",
        type=int,
        default=2,
        help="the policy's own samples per held-out prompt (its KL; the win-rate of earlier stops)",
    )
    p.add_argument(
        "--served-samples", type=int, default=8, help="answers served to a visitor per held-out prompt (the headline win-rate)"
    )
    p.add_argument(
        "--base-samples",
        type=int,
        default=6,
        help="answers of the base per held-out prompt (sampled once); each served answer is judged against each",
    )
    p.add_argument("--eval-batch", type=int, default=36)
    p.add_argument(
        "--thumbs-per-pair", type=int, default=2, choices=(0, 1, 2), help="thumbs cast on the answers of each A/B pair"
    )
    p.add_argument("--record", action="store_true", help="also write bench/results/learning-<rater>.json (committed figures)")
    library = p.add_argument_group("library settings (default: the live worker's, TrainingSettings in rlhf_demo/config.py)")
    library.add_argument("--max-new-tokens", type=int, help="PPOConfig.max_new_tokens (votes, PPO, gate, eval)")
    library.add_argument("--ppo-iterations", type=int, help="PPOConfig.steps per cycle")
    library.add_argument("--ppo-batch-size", type=int, help="PPOConfig.batch_size (rollouts per step)")
    library.add_argument("--samples-per-prompt", type=int, help="PPOConfig.samples_per_prompt")
    library.add_argument("--mini-batch-size", type=int, help="PPOConfig.mini_batch_size")
    library.add_argument("--ppo-epochs", type=int, help="PPOConfig.ppo_epochs")
    library.add_argument("--advantage", choices=("rloo", "gae"), help="PPOConfig.advantage")
    library.add_argument("--ppo-lr", type=float, help="PPOConfig.learning_rate")
    library.add_argument("--kl-coef", type=float, help="PPOConfig.init_kl_coef (the KL penalty in the reward)")
    library.add_argument("--kl-loss-coef", type=float, help="PPOConfig.kl_loss_coef (the exact KL in the loss)")
    library.add_argument("--rm-l2", type=float, help="RewardConfig.l2")
    library.add_argument("--rm-layer", type=int, help="RewardConfig.layer")
    library.add_argument("--gate-prompts", type=int, help="GateConfig.prompts")
    library.add_argument("--gate-samples", type=int, help="GateConfig.samples_per_prompt")
    library.add_argument("--gate-confidence", type=float, help="GateConfig.confidence")
    library.add_argument(
        "--restart-rejected",
        action="store_true",
        help="TrainingSettings.resume_rejected=False: PPO always starts from the served version",
    )
    library.add_argument("--cycle-budget", type=float, help="TrainingSettings.time_budget_s per cycle")
    library.add_argument("--selection", choices=SELECTION_RULES, help="SelectionSettings.rule (Compare's pair)")
    library.add_argument("--candidates", type=int, help="SelectionSettings.candidates")
    library.add_argument("--candidate-temperature", type=float, help="SelectionSettings.candidate_temperature")
    library.add_argument("--best-of", type=int, help="SelectionSettings.best_of (chat answers, and so the evaluation)")
    p.add_argument(
        "--gate", choices=("default", "off"), default="default", help="off: publish every candidate (measurement only)"
    )
    p.add_argument("--quick", action="store_true", help="tiny model, few votes: a smoke run under a minute")
    args = p.parse_args(argv)
    if args.quantization is None:
        args.quantization = "nf4" if torch.cuda.is_available() else "fp32"
    if args.quick:
        args.model = TINY_MODEL
        args.votes, args.cycles, args.heldout, args.eval_samples, args.base_samples, args.served_samples = 24, 2, 8, 1, 2, 2
        args.max_new_tokens, args.ppo_iterations, args.ppo_batch_size, args.rm_epochs = 8, 2, 8, 1
        args.gate_prompts, args.gate_samples = 2, 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "huggingface_hub", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else []
    if len(seeds) > 1:
        run_seeds(args, seeds, argv if argv is not None else sys.argv[1:])
    else:
        args.seed = seeds[0] if seeds else args.seed
        run(args)


def run_seeds(args: argparse.Namespace, seeds: list[int], argv: list[str]) -> None:
    """Each seed in its own process (``--seed N --out <out>/seed-N``), ``--parallel`` at a
    time; then the summary over the seeds whose runs wrote figures (a run cut short counts
    with the cycles it finished)."""
    own = {"--seeds", "--parallel", "--out", "--seed"}
    rest: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in own or name == "--record":
            skip = name != "--record" and "=" not in arg and i + 1 < len(argv)
            continue
        rest.append(arg)
    parallel = args.parallel or max(1, (os.cpu_count() or 1) // max(1, args.threads))
    outs = {seed: Path(args.out) / f"seed-{seed}" for seed in seeds}
    pending = list(seeds)
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < parallel:
            seed = pending.pop(0)
            command = [sys.executable, str(Path(__file__).resolve()), *rest, "--seed", str(seed), "--out", str(outs[seed])]
            log.info("seed %d: %s", seed, " ".join(command))
            running.append(subprocess.Popen(command))
        time.sleep(2)
        running = [proc for proc in running if proc.poll() is None]
    runs = {
        seed: json.loads((out / "learning.json").read_text()) for seed, out in outs.items() if (out / "learning.json").is_file()
    }
    if not runs:
        raise SystemExit("no seed wrote any figures")
    summary = summarize(runs, args.rater, command_line(), device_name(), args.threads or torch.get_num_threads())
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if args.record:
        record(runs, args, command_line())
    for c in summary["cycles"]:
        print(
            f"cycle {c['cycle']}: win-rate {c['win_rate']:.3f} ± {c['win_rate_se'] or 0:.3f} (seeds {summary['seeds']}), KL {c['kl']:.2f}, decisive {c['decisive_fraction']}"
        )


if __name__ == "__main__":
    main()

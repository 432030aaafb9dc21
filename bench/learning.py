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
base on held-out prompts that are never voted on nor used for PPO: the expected verdict of
``--served-samples`` chat answers per prompt, picked as ``selection.best_answer`` picks
(best-of-n as configured: the exact mean over all n-subsets of a pool of served-samples × n
samples, read by the serving process's reward model), against ``--base-samples`` plain
samples of the base, both from the serving process, judged by the rater (ties ½). Beside it, the policy's own samples (the PPO sampler) give its KL to the
reference and the win-rate earlier stops reported. Per cycle: votes, the decisive share of
A/B votes, reward-model accuracy, the gate decision, win-rates, KL, wall time and peak RSS;
writes ``<out>/learning.json`` and ``<out>/learning.png``. ``--seeds 0,1,2`` runs one process
per seed and summarises them as mean ± SE (``<out>/summary.json``; ``--record``:
``bench/results/learning-<rater>.json``).

    python bench/learning.py --rater bench.raters:brevity --votes 200 --cycles 3 --seeds 0,1,2 --record --out bench/out/brevity
    python bench/learning.py --quick --out bench/out/quick     # tiny model, smoke run under a minute

With ``--reuse-finished``, a seed whose ``<out>/seed-N/learning.json`` already holds all
its cycles is summarised without running again (an interrupted multi-seed run resumes).

This file is the entry point and the loop; the parts live beside it: ``learning_votes.py``
(prompts, the rater's votes), ``learning_eval.py`` (served vs base, win-rate),
``learning_output.py`` (JSON, plot, table, record), ``learning_cli.py`` (arguments,
settings, seeds). Results and the reasoning behind the defaults: docs/learning.md.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.learning_cli import gate_config, make_settings, parse_args, run_seeds  # noqa: E402
from bench.learning_eval import Evaluator  # noqa: E402
from bench.learning_output import peak_rss_mb, write  # noqa: E402
from bench.learning_votes import cast_votes, load_prompts, prompt_stream, split_heldout  # noqa: E402
from bench.raters import load_rater  # noqa: E402
from rlhf_demo.config import load_settings  # noqa: E402
from rlhf_demo.modeling import load_model  # noqa: E402
from rlhf_demo.runtime import Runtime  # noqa: E402
from rlhf_demo.worker.cycle import run_cycle  # noqa: E402

log = logging.getLogger("bench.learning")


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
    runtime = Runtime(make_settings(args, data_dir), load_model(model_settings))
    settings = runtime.settings  # with the device's defaults filled in: what runs is what is recorded
    worker = load_model(model_settings)
    log.info("model: %s", worker.describe())
    setup_s = time.perf_counter() - t0

    # v0 is the identity LoRA (B = 0): cycle 0 is the base against itself.
    sampler = settings.training.ppo
    evaluation = Evaluator(
        runtime, worker, rater, heldout, sampler, args.eval_samples, args.served_samples, args.base_samples, args.eval_batch
    )
    rows: list[dict[str, Any]] = []
    base_eval = None
    if evaluated(0, args):
        base_s = evaluation.sample_base()
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
    if base_eval is not None:
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
        ev = evaluation(settings.data_dir / "reward" / f"run-{run_id}") if evaluated(cycle, args) else None
        row = cycle_row(runtime, cycle, total_votes, cast, summary, served, phases, cycle_s, ev, t0)
        rows.append(row)
        result = write(out, args, rows, setup_s, t0, settings)
    runtime.close()
    return result


def evaluated(cycle: int, args: argparse.Namespace) -> bool:
    """Whether ``cycle`` (0: the base) is read by the evaluation, as ``--eval-cycles`` says:
    a best-of-n reading costs more CPU than a cycle, so runs that are judged on their final
    version (or only on their loop's figures) may skip the others."""
    if args.eval_cycles == "none":
        return False
    return args.eval_cycles == "every" or cycle in (0, args.cycles)


def cycle_row(
    runtime: Runtime,
    cycle: int,
    total_votes: int,
    cast: dict[str, Any],
    summary: dict[str, Any],
    served: str,
    phases: dict[str, float],
    cycle_s: float,
    ev: dict[str, Any] | None,
    t0: float,
) -> dict[str, Any]:
    """One cycle's figures in ``learning.json`` (and its line in the log)."""
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
    read = f"win-rate {ev['win_rate']:.2f}, score {ev['mean_score']:.2f}, KL {ev['kl']:.2f}" if ev else "not evaluated"
    log.info(
        "cycle %d: %d votes, RM acc %s, %s %s (%s), %s, decisive A/B %s, %.0f s, peak RSS %.0f MB",
        cycle,
        total_votes,
        row["rm_accuracy"],
        row["decision"],
        row["version"],
        "; ".join(summary["gate"]["reasons"]) or "gate passed",
        read,
        row["decisive_fraction"],
        row["elapsed_s"],
        row["peak_rss_mb"],
    )
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, __doc__ or "")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "huggingface_hub", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else []
    if len(seeds) > 1 or (seeds and args.reuse_finished):  # a finished seed is only summarised
        run_seeds(args, seeds, argv if argv is not None else sys.argv[1:])
    else:
        args.seed = seeds[0] if seeds else args.seed
        run(args)


if __name__ == "__main__":
    main()

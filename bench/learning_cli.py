"""The learning benchmark's command line: its arguments, the library settings they change,
and the runs of several seeds (one process each, then the summary over them)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.learning_output import command_line, device_name, record
from bench.learning_summary import record_path, seed_figures, seeds_in_record, summarize
from bench.learning_votes import PROMPTS_DIR
from rlhf_demo.config import (
    DEFAULT_MODEL,
    SELECTION_RULES,
    TINY_MODEL,
    GateConfig,
    SelectionSettings,
    Settings,
    TrainingSettings,
    for_device,
    load_settings,
)

log = logging.getLogger("bench.learning")
ENTRY = Path(__file__).resolve().with_name("learning.py")  # what each seed's process runs


def add_library_args(p: argparse.ArgumentParser) -> None:
    """Overrides of the library's settings; each unset one keeps the live worker's value."""
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
    library.add_argument(
        "--chosen-loss-coef", type=float, help="PPOConfig.chosen_loss_coef (likelihood of the voters' preferred answers)"
    )
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


def parse_args(argv: list[str] | None = None, description: str = "") -> argparse.Namespace:
    """The command line; ``description``: the entry script's docstring (its first paragraph is shown)."""
    p = argparse.ArgumentParser(description=description.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
        "--served-samples",
        type=int,
        default=8,
        help="answers served per held-out prompt (the headline win-rate; best-of-n draws n times as many and weighs them exactly)",
    )
    p.add_argument(
        "--base-samples",
        type=int,
        default=6,
        help="answers of the base per held-out prompt (sampled once); each served answer is judged against each",
    )
    p.add_argument("--eval-batch", type=int, default=36)
    p.add_argument(
        "--eval-cycles",
        choices=("every", "last", "none"),
        default="every",
        help="which cycles the evaluation reads: every one (and the base), the base and the last, or none (the loop's figures only)",
    )
    p.add_argument(
        "--thumbs-per-pair", type=int, default=2, choices=(0, 1, 2), help="thumbs cast on the answers of each A/B pair"
    )
    p.add_argument("--record", action="store_true", help="also write bench/results/learning-<rater>.json (committed figures)")
    p.add_argument(
        "--reuse-finished",
        action="store_true",
        help="with --seeds: a seed whose <out>/seed-N/learning.json holds all its cycles is summarised, not rerun",
    )
    add_library_args(p)
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
            "chosen_loss_coef": args.chosen_loss_coef,
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


def seed_arguments(argv: list[str]) -> list[str]:
    """The command line each seed's process gets: the parent's, less what only the parent
    acts on (the seeds, where they write, the committed summary, reusing finished seeds)."""
    own = {"--seeds", "--parallel", "--out", "--seed"}
    flags = {"--record", "--reuse-finished"}
    rest: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in own or name in flags:
            skip = name not in flags and "=" not in arg and i + 1 < len(argv)
            continue
        rest.append(arg)
    return rest


def finished_run(out: Path, cycles: int) -> bool:
    """Whether ``out/learning.json`` holds every cycle of a run (the base row and ``cycles``
    more), so the seed need not run again."""
    try:
        rows = json.loads((out / "learning.json").read_text())["cycles"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return len(rows) == cycles + 1


# Arguments that say where a seed ran or what the parent did, not what the seed measured.
# ``eval_cycles`` only says which earlier cycles were read too: the loop and the final
# reading are the same, so a seed read every cycle joins seeds read at the last only
# (:func:`summarize` leaves a cycle's mean out unless every seed read it).
NOT_THE_RUN = {"out", "seed", "seeds", "parallel", "record", "reuse_finished", "models_from", "eval_cycles"}


def command_arguments(command: str | None) -> list[str] | None:
    """The arguments a recorded ``python bench/learning.py …`` command gave, None if it is not one."""
    words = shlex.split(command or "")
    entry = next((i for i, w in enumerate(words) if w.endswith("learning.py")), None)
    return None if entry is None else words[entry + 1 :]


def same_run(command: str | None, args: argparse.Namespace) -> bool:
    """Whether a seed's recorded command measured what ``args`` asks for: every argument
    equal, except where it wrote and where the model was read from."""
    words = command_arguments(command)
    if words is None:
        return False
    try:
        theirs = vars(parse_args(words))
    except SystemExit:  # a command this version's parser no longer reads
        return False
    ours = vars(args)
    return all(theirs.get(k) == v for k, v in ours.items() if k not in NOT_THE_RUN)


def recorded_seeds(args: argparse.Namespace, seeds: list[int]) -> dict[int, dict[str, Any]]:
    """The requested seeds that the committed record already holds with all their cycles,
    from the same arguments and the same selection settings (what ``--reuse-finished`` may
    take from there)."""
    path = record_path(args.rater, device_name())
    try:
        held = seeds_in_record(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    # the defaults may have moved since; a run records them as its device resolved them
    selection = dataclasses.asdict(for_device(make_settings(args, Path(args.out)), device_name()).selection)
    return {
        seed: fig
        for seed, fig in held.items()
        if seed in seeds
        and len(fig["rows"]) == args.cycles + 1
        and same_run(fig["command"], args)
        and fig["selection"] == selection
    }


def run_seeds(args: argparse.Namespace, seeds: list[int], argv: list[str]) -> None:
    """Each seed in its own process (``--seed N --out <out>/seed-N``), ``--parallel`` at a
    time; then the summary over the seeds whose runs wrote figures (a run cut short counts
    with the cycles it finished). With ``--reuse-finished`` a seed whose run already holds
    all its cycles, in ``<out>`` or in the committed record, is only summarised, so an
    interrupted multi-seed run resumes and new seeds join those recorded earlier."""
    rest = seed_arguments(argv)
    parallel = args.parallel or max(1, (os.cpu_count() or 1) // max(1, args.threads))
    outs = {seed: Path(args.out) / f"seed-{seed}" for seed in seeds}
    finished = {seed for seed in seeds if args.reuse_finished and finished_run(outs[seed], args.cycles)}
    recorded = {s: f for s, f in recorded_seeds(args, seeds).items() if s not in finished} if args.reuse_finished else {}
    pending = [seed for seed in seeds if seed not in finished and seed not in recorded]
    for seed in sorted(finished):
        log.info("seed %d: finished in %s, reused", seed, outs[seed])
    for seed in sorted(recorded):
        log.info("seed %d: held by the committed record (%s), reused", seed, recorded[seed]["commit"] or "commit unknown")
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < parallel:
            seed = pending.pop(0)
            command = [sys.executable, str(ENTRY), *rest, "--seed", str(seed), "--out", str(outs[seed])]
            log.info("seed %d: %s", seed, " ".join(command))
            running.append(subprocess.Popen(command))
        time.sleep(2)
        running = [proc for proc in running if proc.poll() is None]
    summarise_seeds(args, {seed: out for seed, out in outs.items() if seed not in recorded}, recorded)


def summarise_seeds(args: argparse.Namespace, outs: dict[int, Path], recorded: dict[int, dict[str, Any]]) -> None:
    """``<out>/summary.json`` (and with ``--record`` the committed figures) over the seeds
    whose runs wrote figures and those reused from the committed record."""
    figures = dict(recorded)
    for seed, out in outs.items():
        if (out / "learning.json").is_file():
            figures[seed] = seed_figures(json.loads((out / "learning.json").read_text()))
    if not figures:
        raise SystemExit("no seed wrote any figures")
    summary = summarize(figures, args.rater, command_line(), device_name(), args.threads or torch.get_num_threads())
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if args.record:
        record(figures, args, command_line())
    for c in summary["cycles"]:
        read = (
            f"win-rate {c['win_rate']:.3f} ± {c['win_rate_se'] or 0:.3f}, KL {c['kl']:.2f}"
            if c["win_rate"] is not None
            else "not evaluated"
        )
        print(f"cycle {c['cycle']} (seeds {summary['seeds']}): {read}, decisive A/B {c['decisive_fraction']}")

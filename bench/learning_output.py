"""The learning benchmark's output: ``learning.json`` and ``learning.png`` per run, the
table on stdout, and the committed summary over seeds (``--record``)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.learning_summary import record_path, seed_figures, summarize
from rlhf_demo.config import Settings


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def device_name() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def command_line() -> str:
    return "python bench/learning.py " + " ".join(sys.argv[1:])


def git(root: Path, *words: str) -> str | None:
    """A git command's output in ``root``, None where git or the checkout is missing."""
    try:
        done = subprocess.run(["git", *words], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def describe(root: Path) -> str | None:
    """The commit checked out in ``root``, ``-dirty`` when a tracked file differs from it;
    the results folder does not count: runs recording side by side rewrite it while they run."""
    commit = git(root, "describe", "--always", "--abbrev=12")
    if commit is None:
        return None
    changed = git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    return commit + ("-dirty" if changed else "")


@functools.cache  # read once, at the first row: a commit made during the run is not the run's
def code_version() -> str | None:
    """The commit the benchmark runs (``-dirty`` with uncommitted changes): committed figures
    must come from committed code. ``BENCH_CODE_VERSION``, when set, names it instead: a
    device's copy of the tree may carry no ``.git``, or an older one than the tree it got."""
    return os.environ.get("BENCH_CODE_VERSION") or describe(Path(__file__).resolve().parents[1])


def record(figures: dict[int, dict[str, Any]], args: argparse.Namespace, command: str) -> Path:
    """The small committed summary (mean ± SE over the seeds, ``figures`` as
    ``seed_figures`` gives them): ``bench/results/learning-<rater>[-cuda].json``."""
    summary = summarize(figures, args.rater, command, device_name(), torch.get_num_threads())
    path = record_path(args.rater, device_name())
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return path


def write(
    out: Path, args: argparse.Namespace, rows: list[dict[str, Any]], setup_s: float, t0: float, settings: Settings
) -> dict[str, Any]:
    last = rows[-1]
    last_eval = last["eval"] or {}  # None where --eval-cycles skipped the cycle
    elapsed = time.perf_counter() - t0
    eval_s = sum(r["eval"].get("base_sampling_seconds", 0.0) + r["eval"]["seconds"] for r in rows if r["eval"])
    final = {
        "win_rate": last_eval.get("win_rate"),
        "win_rate_se": last_eval.get("win_rate_se"),
        "comparisons": last_eval.get("comparisons"),
        "rm_accuracy": last.get("rm_accuracy"),
        "kl": last_eval.get("kl"),
        "votes": last["votes"],
        "elapsed_s": elapsed,
        "wall_s": elapsed - setup_s - eval_s,  # the loop itself: votes and cycles
        "eval_s": eval_s,
        "peak_rss_mb": peak_rss_mb(),
    }
    result = {
        "command": command_line(),
        "commit": code_version(),
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
        record({args.seed: seed_figures(result)}, args, result["command"])
    plot(out / "learning.png", rows, args)
    print_table(rows)
    return result


def print_table(rows: list[dict[str, Any]]) -> None:
    def f(x: Any, fmt: str = ".2f") -> str:
        return "-" if x is None else format(x, fmt)

    print(
        f"{'cycle':>5} {'votes':>5} {'used':>5} {'RM acc':>7} {'RM eval':>7} {'gate':>9} {'score':>7} {'base':>7} "
        f"{'KL':>6} {'win':>5} {'tokens':>6} {'EOS':>5} {'time s':>7} {'RSS MB':>7}  win SE  read SE"
    )
    for r in rows:
        ev = r["eval"]
        if not ev:
            print(
                f"{r['cycle']:>5} {r['votes']:>5} {f(r.get('votes_used'), 'd'):>5} {f(r.get('rm_accuracy')):>7} {'-':>7} "
                f"{r['decision']:>9}  (not evaluated)  decisive A/B {f(r.get('decisive_fraction'))}  {r['elapsed_s']:.0f} s"
            )
            continue
        print(
            f"{r['cycle']:>5} {r['votes']:>5} {f(r.get('votes_used'), 'd'):>5} {f(r.get('rm_accuracy')):>7} {f(ev.get('rm_eval_accuracy')):>7} "
            f"{r['decision']:>9} {ev['mean_score']:>7.2f} {ev['base_mean_score']:>7.2f} {ev['kl']:>6.2f} {ev['win_rate']:>5.2f} "
            f"{ev['mean_tokens']:>6.1f} {ev['eos_rate']:>5.2f} {r['elapsed_s']:>7.0f} {r['peak_rss_mb']:>7.0f}  ±{ev['win_rate_se']:.2f}   ±{ev.get('read_se') or float('nan'):.3f}"
        )
    sys.stdout.flush()


def plot(path: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["cycle"] for r in rows]

    def read(key: str) -> list[Any]:  # one evaluation figure per cycle, None where it was not read
        return [(r["eval"] or {}).get(key) for r in rows]

    def line(ax: Any, ys: list[Any], **style: Any) -> None:
        pts = [(a, b) for a, b in zip(x, ys, strict=True) if b is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), **style)

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    panels = [
        ("win-rate vs base (held-out)", read("win_rate"), 0.8),
        ("reward model accuracy", [r.get("rm_accuracy") for r in rows], 0.85),
        ("KL to reference (nats / answer)", read("kl"), 6.0),
        ("mean rater score", read("mean_score"), None),
        ("mean answer length (tokens)", read("mean_tokens"), None),
    ]
    for ax, (title, ys, target) in zip(axes.flat, panels, strict=False):
        line(ax, ys, marker="o")
        if title == "reward model accuracy":
            line(ax, read("rm_eval_accuracy"), marker="s", linestyle="--", label="on eval pairs")
            ax.set_ylim(0, 1.05)
            ax.legend(["library held-out split", "held-out rater pairs"], fontsize=7)
        if title == "mean rater score":
            line(ax, read("base_mean_score"), marker="x", linestyle="--", label="base")
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

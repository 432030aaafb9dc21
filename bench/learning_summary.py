"""The committed summary of ``bench/learning.py``: one or more seeds' runs, mean ± SE.

Why a module of its own: arms are told apart by the same seeds, so the summary is across
seeds (the standard error of the seeds' win-rates), and a run that was cut short still
leaves its figures so far. ``bench/results/learning-<rater>[-cuda].json`` holds it, with
each seed's own rows, times, command and commit, so a seed run later (on another machine,
in another session) can join the seeds already recorded (:func:`seeds_in_record`).
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def mean_se(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean (None for an SE of one value)."""
    if not values:
        return None, None
    if len(values) == 1:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5


def cycle_row(r: dict[str, Any]) -> dict[str, Any]:
    """One cycle of one seed, the figures worth committing (the evaluation's as None where
    ``--eval-cycles`` did not read the cycle)."""
    ev = r["eval"] or {}
    return {
        "cycle": r["cycle"],
        "votes": r["votes"],
        "decision": r["decision"],
        "served": r.get("served", "v0"),
        "trained_from": r.get("trained_from"),
        "decisive_fraction": r.get("decisive_fraction"),
        "rules": (r.get("cast") or {}).get("rules"),
        "shown_mean_score": (r.get("cast") or {}).get("mean_score"),  # the rater's mean score of the Compare answers
        "rm_accuracy": r.get("rm_accuracy"),
        "rm_eval_accuracy": ev.get("rm_eval_accuracy"),
        "feature_gap": ev.get("feature_gap"),
        "gate": {k: r["gate"].get(k) for k in ("improvement", "lower_bound", "units", "kl", "reasons")}
        if r.get("gate")
        else None,
        "ppo": [
            {k: round(v, 4) for k, v in step.items() if k in ("score", "kl", "response_length")} for step in r.get("ppo", [])
        ],
        "win_rate": ev.get("win_rate"),
        "win_rate_se": ev.get("win_rate_se"),
        "read_se": ev.get("read_se"),  # from the served answers' sampling alone: a second read moves about √2 × this
        "comparisons": ev.get("comparisons"),
        "policy_win_rate": (ev.get("policy") or {}).get("win_rate"),
        "picked_from": ev.get("picked_from"),
        "kl": ev.get("kl"),
        "mean_score": ev.get("mean_score"),
        "mean_tokens": ev.get("mean_tokens"),
        "eval_s": ev.get("seconds", 0.0),
        "elapsed_s": r["elapsed_s"],
    }


def progress_line(name: str, run: dict[str, Any]) -> str:
    """One seed's cycles so far, on one line: what a run cut short (by a device's time, say)
    has to show, where ``--eval-cycles`` left most cycles unread."""

    def figure(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    words = [name]
    for row in map(cycle_row, run["cycles"]):
        if row["cycle"] == 0:
            words.append(f"base {figure(row['win_rate'], 3)}")
            continue
        gate_kl = (row["gate"] or {}).get("kl")
        words.append(
            f"| c{row['cycle']} {row['decision']} decisive {figure(row['decisive_fraction'])} ppo {len(row['ppo'])}"
            f" kl {figure(gate_kl)} shown {figure(row['shown_mean_score'])} win {figure(row['win_rate'], 3)}"
            f" {row['elapsed_s']:.0f} s"
        )
    return " ".join(words)


def seed_figures(run: dict[str, Any]) -> dict[str, Any]:
    """What the summary keeps of one seed's ``learning.json``: its cycle rows, its times, the
    command and commit that produced it, its selection settings."""
    return {
        "rows": [cycle_row(r) for r in run["cycles"]],
        "wall_s": run["final"]["wall_s"],
        "eval_s": run["final"]["eval_s"],
        "command": run.get("command"),
        "commit": run.get("commit"),
        "selection": run["selection"],
    }


def seeds_in_record(record: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The seeds a committed record holds, as :func:`seed_figures` gives them. Records
    written before per-seed times were kept hold one seed, whose times are the record's."""
    times = record.get("seed_times") or {}
    commits = record.get("seed_commits") or {}
    out: dict[int, dict[str, Any]] = {}
    for seed in record["seeds"]:
        key = str(seed)
        if key not in times and len(record["seeds"]) > 1:
            continue  # no times of its own: it cannot be told apart from the mean
        rows = [{"comparisons": record["comparisons"], **c["seeds"][key]} for c in record["cycles"] if key in c["seeds"]]
        out[int(seed)] = {
            "rows": rows,
            "wall_s": times.get(key, {}).get("wall_s", record["wall_s"]),
            "eval_s": times.get(key, {}).get("eval_s", record["eval_s"]),
            "command": (record.get("seed_commands") or {}).get(key),
            "commit": commits.get(key),
            "selection": record["selection"],
        }
    return out


def summarize(figures: dict[int, dict[str, Any]], rater: str, command: str, device: str, threads: int) -> dict[str, Any]:
    """Mean ± SE over the seeds (``figures[seed]`` as :func:`seed_figures` gives it), per
    cycle and final; a seed's cycles beyond the shortest run are left out of the means, so
    every row compares the same seeds."""
    seeds = sorted(figures)
    per_seed = {seed: figures[seed]["rows"] for seed in seeds}
    depth = min(len(rows) for rows in per_seed.values())
    cycles = []
    for i in range(depth):
        rows = [per_seed[seed][i] for seed in seeds]
        read_by_all = all(r["win_rate"] is not None for r in rows)  # else the mean would mix other seeds
        win, se = mean_se([r["win_rate"] for r in rows]) if read_by_all else (None, None)
        kls = [r["kl"] for r in rows] if read_by_all else []
        decisive = [r["decisive_fraction"] for r in rows if r["decisive_fraction"] is not None]
        cycles.append(
            {
                "cycle": rows[0]["cycle"],
                "votes": rows[0]["votes"],
                "win_rate": win,
                "win_rate_se": se if se is not None or not read_by_all else rows[0]["win_rate_se"],
                "kl": statistics.fmean(kls) if kls else None,
                "decisive_fraction": statistics.fmean(decisive) if decisive else None,
                "decisions": [r["decision"] for r in rows],
                "seeds": {str(seed): row for seed, row in zip(seeds, rows, strict=True)},
            }
        )
    last = cycles[-1]
    decisive = [c["decisive_fraction"] for c in cycles if c["decisive_fraction"] is not None]
    return {
        "rater": rater,
        "votes": last["votes"],
        "seeds": seeds,
        "win_rate": last["win_rate"],
        "win_rate_se": last["win_rate_se"],
        "win_rate_se_over": "seeds" if len(seeds) > 1 else "prompts (one seed)",
        "comparisons": per_seed[seeds[0]][depth - 1]["comparisons"],  # per seed
        "kl": last["kl"],
        "wall_s": statistics.fmean(figures[seed]["wall_s"] for seed in seeds),
        "eval_s": statistics.fmean(figures[seed]["eval_s"] for seed in seeds),
        "device": device,
        "cpu": f"{os.cpu_count()} cores",
        "torch_threads": threads,
        "command": command,
        "seed_commands": {str(seed): figures[seed]["command"] for seed in seeds},  # what each seed's run was
        "seed_commits": {str(seed): figures[seed]["commit"] for seed in seeds},  # the code each seed ran
        "seed_times": {str(seed): {k: figures[seed][k] for k in ("wall_s", "eval_s")} for seed in seeds},
        "selection": figures[seeds[0]]["selection"],
        "best_of": figures[seeds[0]]["selection"]["best_of"],
        "decisive_fraction": statistics.fmean(decisive) if decisive else None,
        "cycles": cycles,
    }


def record_path(rater: str, device: str) -> Path:
    name = rater.rpartition(":")[2]
    return RESULTS_DIR / f"learning-{name}{'-cuda' if device == 'cuda' else ''}.json"


__all__ = ["RESULTS_DIR", "cycle_row", "mean_se", "record_path", "seed_figures", "seeds_in_record", "summarize"]

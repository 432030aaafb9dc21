"""The learning benchmark's committed summary: mean ± SE across seeds, over the cycles every
seed finished, with the fields the issue's readers look for."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bench.learning_summary import progress_line, seed_figures, seeds_in_record, summarize
from rlhf_demo.config import Settings, device_defaults, for_device

FIELDS = {
    "rater",
    "votes",
    "seeds",
    "win_rate",
    "win_rate_se",
    "comparisons",
    "kl",
    "wall_s",
    "eval_s",
    "device",
    "command",
    "selection",
    "best_of",
    "decisive_fraction",
    "cycles",
}


def run(wins: list[float], decisive: list[float | None]) -> dict:
    cycles = [
        {
            "cycle": i,
            "votes": 67 * i,
            "decision": "base" if i == 0 else "published",
            "decisive_fraction": d,
            "eval": {
                "win_rate": w,
                "win_rate_se": 0.01,
                "kl": 0.5 * i,
                "mean_score": 0.0,
                "mean_tokens": 30.0,
                "seconds": 10.0,
                "comparisons": 1728,
            },
            "elapsed_s": 100.0 * i,
        }
        for i, (w, d) in enumerate(zip(wins, decisive, strict=True))
    ]
    return {
        "command": "python bench/learning.py --cycles 3 --seed 0",
        "commit": "a4a2ee2",
        "cycles": cycles,
        "final": {"wall_s": 900.0, "eval_s": 120.0},
        "selection": dataclasses.asdict(for_device(Settings(), "cpu").selection),  # what the library runs on a CPU now
    }


def test_summary_is_mean_and_se_over_seeds_on_the_cycles_all_seeds_finished():
    runs = {0: run([0.5, 0.6, 0.7], [None, 0.3, 0.5]), 1: run([0.5, 0.7], [None, 0.5]), 2: run([0.5, 0.8, 0.9], [None, 0.4, 0.6])}
    summary = summarize(
        {seed: seed_figures(r) for seed, r in runs.items()},
        "bench.raters:keyword",
        "python bench/learning.py --seeds 0,1,2",
        "cpu",
        1,
    )
    assert FIELDS <= set(summary)
    assert summary["seeds"] == [0, 1, 2] and len(summary["cycles"]) == 2  # seed 1 stopped after cycle 1
    assert summary["win_rate"] == pytest.approx(0.7)
    assert summary["win_rate_se"] == pytest.approx(0.1 / 3**0.5)
    assert summary["cycles"][1]["decisive_fraction"] == pytest.approx(0.4)
    assert summary["best_of"] == device_defaults("cpu").best_of and summary["votes"] == 67


def test_one_seed_keeps_its_within_run_standard_error():
    summary = summarize({0: seed_figures(run([0.5, 0.6], [None, 0.3]))}, "bench.raters:brevity", "cmd", "cpu", 1)
    assert summary["win_rate_se"] == 0.01 and summary["win_rate_se_over"] == "prompts (one seed)"


def test_a_record_gives_back_each_seed_so_later_seeds_can_join_it():
    runs = {0: run([0.5, 0.6, 0.7], [None, 0.3, 0.5]), 2: run([0.5, 0.8, 0.9], [None, 0.4, 0.6])}
    runs[2]["final"] = {"wall_s": 700.0, "eval_s": 100.0}
    figures = {seed: seed_figures(r) for seed, r in runs.items()}
    recorded = summarize(figures, "bench.raters:keyword", "cmd", "cpu", 1)
    assert seeds_in_record(recorded) == figures
    joined = summarize({**seeds_in_record(recorded), 1: seed_figures(run([0.5, 0.7, 0.8], [None, 0.5, 0.5]))}, "r", "c", "cpu", 1)
    assert joined["seeds"] == [0, 1, 2] and joined["win_rate"] == pytest.approx(0.8)
    assert joined["seed_times"]["2"] == {"wall_s": 700.0, "eval_s": 100.0} and joined["seed_commits"]["1"] == "a4a2ee2"


def test_a_one_seed_record_from_before_per_seed_times_still_gives_its_seed():
    old = summarize({0: seed_figures(run([0.5, 0.6, 0.7], [None, 0.3, 0.5]))}, "bench.raters:keyword", "cmd", "cpu", 1)
    for key in ("seed_times", "seed_commits"):
        del old[key]
    for c in old["cycles"]:
        del c["seeds"]["0"]["comparisons"]
    (seed,) = seeds_in_record(old).values()
    assert seed["wall_s"] == 900.0 and seed["eval_s"] == 120.0 and seed["commit"] is None
    assert [r["comparisons"] for r in seed["rows"]] == [1728] * 3 and [r["win_rate"] for r in seed["rows"]] == [0.5, 0.6, 0.7]


def test_a_run_is_dirty_for_code_changes_not_for_records_written_beside_it(tmp_path: Path) -> None:
    """Seeds recording side by side rewrite bench/results while the others run: that must not
    mark their code as uncommitted, while a changed source file must."""
    import subprocess

    from bench.learning_output import describe

    def git(*words: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *words], cwd=tmp_path, check=True, capture_output=True
        )

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "learning-brevity.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "first")
    clean = describe(tmp_path)
    assert clean is not None and not clean.endswith("-dirty")
    (tmp_path / "bench" / "results" / "learning-brevity.json").write_text('{"seeds": [0]}')
    assert describe(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert describe(tmp_path) == clean + "-dirty"
    outside = tmp_path.parent / f"{tmp_path.name}-not-a-checkout"
    outside.mkdir()
    assert describe(outside) is None


def test_cycles_the_evaluation_skipped_keep_their_loop_figures_and_the_final_reads_the_last():
    """``--eval-cycles last``: cycles 1 and 2 of three were not read; their decisive fraction
    still averages over the seeds, and the final win-rate is the last cycle's."""
    runs = {seed: run([0.5, 0.0, 0.0, 0.6 + 0.1 * seed], [None, 0.2, 0.4, 0.6]) for seed in (0, 1)}
    for r in runs.values():
        for c in r["cycles"][1:3]:
            c["eval"] = None
    summary = summarize({s: seed_figures(r) for s, r in runs.items()}, "bench.raters:keyword", "cmd", "cpu", 1)
    assert [c["win_rate"] for c in summary["cycles"]][:3] == [0.5, None, None]
    assert summary["cycles"][2]["decisive_fraction"] == pytest.approx(0.4) and summary["cycles"][1]["kl"] is None
    assert summary["win_rate"] == pytest.approx(0.65) and summary["kl"] == pytest.approx(1.5)


def test_a_cycle_read_by_some_seeds_only_has_no_mean_but_keeps_each_seeds_reading():
    """A seed read every cycle beside seeds read at the last only: cycle 1's mean would be
    one seed's figure under the label of three, so it is left out; the final is over all."""
    runs = {seed: run([0.5, 0.6, 0.7 + 0.1 * seed], [None, 0.3, 0.5]) for seed in (0, 1, 2)}
    for seed in (1, 2):
        runs[seed]["cycles"][1]["eval"] = None
    summary = summarize({s: seed_figures(r) for s, r in runs.items()}, "bench.raters:keyword", "cmd", "cpu", 1)
    cycle = summary["cycles"][1]
    assert cycle["win_rate"] is None and cycle["win_rate_se"] is None and cycle["kl"] is None
    assert cycle["seeds"]["0"]["win_rate"] == 0.6 and cycle["decisive_fraction"] == pytest.approx(0.3)
    assert summary["win_rate"] == pytest.approx(0.8) and summary["win_rate_se"] == pytest.approx(0.1 / 3**0.5)


def test_progress_of_a_run_cut_short_reads_cycles_the_evaluation_skipped():
    """What ``bench/gpu.sh collect`` prints of each seed while runs go on: with
    ``--eval-cycles last`` the cycles read nothing, and their loop figures (decision, PPO
    steps, the gate's KL, the rater's mean score of the Compare answers) are all there is."""
    r = run([0.5, 0.0, 0.0], [None, 0.13, 0.39])
    for c in r["cycles"][1:]:
        c["eval"] = None
    r["cycles"][1].update(ppo=[{"score": 0.1, "kl": 0.5}] * 13, gate={"kl": 1.96, "reasons": []}, cast={"mean_score": 0.39})
    r["cycles"][2].update(decision="rejected", ppo=[], gate=None, cast={"mean_score": 1.13})
    line = progress_line("enthusiasm/seed-0", r)
    assert line.startswith("enthusiasm/seed-0 base 0.500")
    assert "c1 published decisive 0.13 ppo 13 kl 1.96 shown 0.39 win -" in line
    assert "c2 rejected decisive 0.39 ppo 0 kl - shown 1.13 win -" in line

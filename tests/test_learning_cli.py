"""The learning benchmark's multi-seed runner: which seeds it starts, with which arguments,
and that ``--reuse-finished`` resumes an interrupted run without redoing finished seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import learning_cli
from bench.learning_summary import seed_figures, summarize
from tests.test_learning_summary import run as finished_cycles


def write_run(folder: Path, rows: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    wins = [0.5 + 0.1 * i for i in range(rows)]
    (folder / "learning.json").write_text(json.dumps(finished_cycles(wins, [None] + [0.5] * (rows - 1))))


@pytest.fixture(autouse=True)
def no_committed_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed ``bench/results`` must not decide what these tests run: a record that
    holds seeds 0-2 of the default rater would otherwise be reused in place of running them."""
    monkeypatch.setattr(learning_cli, "record_path", lambda _rater, _device: tmp_path / "no-record.json")


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Seed processes are recorded, not run: each 'finishes' at once with 3 cycles."""
    commands: list[list[str]] = []

    class FinishedAtOnce:
        def __init__(self, command: list[str]) -> None:
            commands.append(command)
            write_run(Path(command[command.index("--out") + 1]), 4)

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(learning_cli.subprocess, "Popen", FinishedAtOnce)
    monkeypatch.setattr(learning_cli.time, "sleep", lambda _s: None)
    return commands


def seeds_run(commands: list[list[str]]) -> list[int]:
    return [int(c[c.index("--seed") + 1]) for c in commands]


def test_reuse_finished_reruns_only_the_seeds_that_did_not_finish(tmp_path: Path, started: list[list[str]]) -> None:
    write_run(tmp_path / "seed-0", 4)  # the base row and 3 cycles: finished
    write_run(tmp_path / "seed-1", 2)  # cut short after cycle 1
    argv = ["--cycles", "3", "--seeds", "0,1,2", "--out", str(tmp_path), "--reuse-finished", "--threads", "1"]
    args = learning_cli.parse_args(argv)
    learning_cli.run_seeds(args, [0, 1, 2], argv)
    assert seeds_run(started) == [1, 2]
    assert all("--reuse-finished" not in c and "--seeds" not in c for c in started)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == [0, 1, 2] and len(summary["cycles"]) == 4


def test_without_reuse_finished_every_seed_runs_again(tmp_path: Path, started: list[list[str]]) -> None:
    write_run(tmp_path / "seed-0", 4)
    argv = ["--cycles", "3", "--seeds", "0,1", "--out", str(tmp_path), "--threads", "1"]
    learning_cli.run_seeds(learning_cli.parse_args(argv), [0, 1], argv)
    assert seeds_run(started) == [0, 1]


def test_one_finished_seed_with_reuse_finished_is_summarised_not_run_again(tmp_path: Path, started: list[list[str]]) -> None:
    from bench import learning

    write_run(tmp_path / "seed-0", 4)
    learning.main(["--cycles", "3", "--seeds", "0", "--out", str(tmp_path), "--reuse-finished", "--threads", "1"])
    assert started == []
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == [0] and len(summary["cycles"]) == 4
    assert summary["seed_commands"] == {"0": "python bench/learning.py --cycles 3 --seed 0"}


def recorded_seed_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    """A committed record (redirected into tmp_path) that holds seed 0, run by ``command``."""
    figures = {0: seed_figures(finished_cycles([0.5, 0.6, 0.7, 0.9], [None, 0.5, 0.5, 0.5]))}
    figures[0]["command"] = command
    path = tmp_path / "learning-keyword.json"
    path.write_text(json.dumps(summarize(figures, "bench.raters:keyword", "cmd", "cpu", 1)))
    monkeypatch.setattr(learning_cli, "record_path", lambda _rater, _device: path)


SEED_ZERO = "python bench/learning.py --rater bench.raters:keyword --cycles 3 --threads 1 --models-from /elsewhere --seed 0 --out /old/seed-0"


def test_reuse_finished_takes_a_seed_from_the_committed_record_run_with_the_same_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: list[list[str]]
) -> None:
    recorded_seed_zero(tmp_path, monkeypatch, SEED_ZERO)
    out = tmp_path / "runs"
    argv = ["--rater", "bench.raters:keyword", "--cycles", "3", "--seeds", "0,1,2", "--out", str(out), "--reuse-finished"]
    argv += ["--threads", "1"]
    learning_cli.run_seeds(learning_cli.parse_args(argv), [0, 1, 2], argv)
    assert seeds_run(started) == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1, 2] and summary["seed_commands"]["0"] == SEED_ZERO
    assert summary["cycles"][-1]["seeds"]["0"]["win_rate"] == 0.9


def test_a_seed_read_every_cycle_joins_seeds_read_at_the_last_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: list[list[str]]
) -> None:
    """``--eval-cycles`` chooses which earlier cycles are read, not what the loop or its final
    reading measure: a recorded seed read every cycle is reused by a run that reads the last."""
    recorded_seed_zero(tmp_path, monkeypatch, SEED_ZERO)
    argv = ["--rater", "bench.raters:keyword", "--cycles", "3", "--seeds", "0,1", "--out", str(tmp_path / "runs")]
    argv += ["--reuse-finished", "--threads", "1", "--eval-cycles", "last"]
    learning_cli.run_seeds(learning_cli.parse_args(argv), [0, 1], argv)
    assert seeds_run(started) == [1]
    assert "--eval-cycles" in started[0] and started[0][started[0].index("--eval-cycles") + 1] == "last"


@pytest.mark.parametrize("differs", ["--votes 100", "--selection passive", "--threads 2"])
def test_a_recorded_seed_from_other_arguments_runs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: list[list[str]], differs: str
) -> None:
    recorded_seed_zero(
        tmp_path,
        monkeypatch,
        SEED_ZERO.replace("--threads 1", f"--threads 1 {differs}").replace("--threads 1 --threads 2", "--threads 2"),
    )
    argv = ["--rater", "bench.raters:keyword", "--cycles", "3", "--seeds", "0,1", "--out", str(tmp_path / "runs")]
    argv += ["--reuse-finished", "--threads", "1"]
    learning_cli.run_seeds(learning_cli.parse_args(argv), [0, 1], argv)
    assert seeds_run(started) == [0, 1]


def test_a_recorded_seed_from_other_library_defaults_runs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: list[list[str]]
) -> None:
    """The same command measures something else once a library default changes (best-of-n
    serving, say): a seed recorded under the old default must not join the new record."""
    recorded_seed_zero(tmp_path, monkeypatch, SEED_ZERO)
    record = tmp_path / "learning-keyword.json"
    old = json.loads(record.read_text())
    old["selection"] = {**old["selection"], "best_of": old["selection"]["best_of"] + 1}
    record.write_text(json.dumps(old))
    argv = ["--rater", "bench.raters:keyword", "--cycles", "3", "--seeds", "0,1", "--out", str(tmp_path / "runs")]
    argv += ["--reuse-finished", "--threads", "1"]
    learning_cli.run_seeds(learning_cli.parse_args(argv), [0, 1], argv)
    assert seeds_run(started) == [0, 1]


@pytest.mark.parametrize(
    ("choice", "read"),
    [("every", [0, 1, 2, 3]), ("last", [0, 3]), ("none", [])],
)
def test_eval_cycles_chooses_which_cycles_are_read(choice: str, read: list[int]) -> None:
    from bench.learning import evaluated

    args = learning_cli.parse_args(["--cycles", "3", "--eval-cycles", choice], "")
    assert [c for c in range(4) if evaluated(c, args)] == read

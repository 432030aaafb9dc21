"""The learning benchmark's multi-seed runner: which seeds it starts, with which arguments,
and that ``--reuse-finished`` resumes an interrupted run without redoing finished seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import learning_cli
from tests.test_learning_summary import run as finished_cycles


def write_run(folder: Path, rows: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    wins = [0.5 + 0.1 * i for i in range(rows)]
    (folder / "learning.json").write_text(json.dumps(finished_cycles(wins, [None] + [0.5] * (rows - 1))))


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
    assert summary["seeds"] == [0] and summary["seed_commands"] == {"0": None} and len(summary["cycles"]) == 4

"""Hub sync across restarts, as processes: SIGTERM at random moments, a fresh data dir on each
start (a Space's disk is wiped), and every acknowledged vote comes back (bench/hub_restarts.py
runs the same with more cycles)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests import fake_hub as fake_hub_module

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import hub_restarts  # noqa: E402

fake_hub = fake_hub_module.fake_hub  # the fixture, usable in this module


@pytest.mark.skipif(sys.platform != "linux", reason="signals as on a Space")
def test_votes_acknowledged_before_a_sigterm_are_restored_on_a_fresh_start(
    fake_hub, tiny_model_dir: Path, tmp_path: Path
) -> None:
    figures = hub_restarts.run(fake_hub, str(tiny_model_dir), tmp_path, cycles=2, seed=0, window_s=4.0)
    serving = [c for c in figures["per_cycle"] if c["killed"] == "serving"]
    assert serving and figures["acknowledged"] > 0, "no cycle cast a vote: the test proves nothing"
    assert figures["lost"] == [], f"acknowledged votes lost: {figures['lost']}"
    assert all(not c.get("lost_before_this_start") for c in serving)
    assert [c["exit_code"] for c in serving] == [0] * len(serving)  # a clean stop, the last push included
    assert figures["history_commits"] == 1  # every push squashed: no older snapshot in the history


def test_a_second_sigterm_does_not_cut_the_shutdown_short() -> None:
    """Only the first signal interrupts; later ones (an impatient orchestrator, a second
    Ctrl+C) used to interrupt ``demo.close()`` and skip the last Hub push (exit status 1)."""
    import signal

    from rlhf_demo import cli

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        cli.stop_on_sigterm()
        handler = signal.getsignal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGTERM, None)
        assert cli.STOP.is_set()
        assert handler(signal.SIGTERM, None) is None  # shutting down: ignored
        cli.stop_on_sigterm()  # a new serve() starts with the flag cleared
        assert not cli.STOP.is_set()
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])

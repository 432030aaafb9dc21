"""20 concurrent API sessions chat and vote (loopback, bounded): every vote is a row, no errors."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_twenty_concurrent_sessions_lose_no_vote(tiny_model_dir, tmp_path):
    from load import run

    result = run(str(tiny_model_dir), sessions=20, turns=1, max_new_tokens=6, data_dir=tmp_path)
    assert result["errors"] == []
    assert result["thumbs_stored"] == result["thumbs_sent"] == 20
    assert result["pairs_stored"] == result["pairs_sent"] == 20

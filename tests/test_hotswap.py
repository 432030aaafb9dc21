"""Publishing while API clients chat: the server switches by itself, and no request fails."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_publish_during_concurrent_chats_swaps_with_zero_failures(tiny_model_dir, tmp_path):
    from hotswap import run

    result = run(str(tiny_model_dir), versions=2, clients=3, max_new_tokens=6, data_dir=tmp_path, quantization="fp32", poll_s=0.2)
    assert result["failed"] == 0, result["failures"]
    assert [s["version"] for s in result["swaps"]] == ["v1", "v2"]
    for swap in result["swaps"]:
        assert not math.isnan(swap["publish_to_first_answer_s"]), "the new version never answered"
        assert swap["mode"] == "hotswap" and swap["swap_load_ms"] == 0.0, "a swap held the generation lock"
        assert swap["baseline_load_ms"] > 0
    assert result["requests"] > 6

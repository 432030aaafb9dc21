"""Model folders built once per data dir (tiny model, converted GGUF): processes that start
at the same time on a fresh data dir each end with the same complete folder."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from rlhf_demo.modeling.tiny import MARKER, build_tiny_model


def _build_then_load(target: str, barrier, results) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    barrier.wait(timeout=120)
    try:
        folder = build_tiny_model(Path(target))
        AutoTokenizer.from_pretrained(folder)
        AutoModelForCausalLM.from_pretrained(folder)
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - the report is the test's failure message
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_starting_together_share_one_built_folder(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    n = 3
    barrier, results = ctx.Barrier(n), ctx.Queue()
    target = tmp_path / "models" / "tiny"
    procs = [ctx.Process(target=_build_then_load, args=(str(target), barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert outcomes == ["ok"] * n
    assert (target / MARKER).is_file()
    assert not list(target.parent.glob("*.tmp"))

"""Model loading: folders built once per data dir (tiny model, converted GGUF) stay whole
when processes start together on a fresh data dir; importing the libraries stays quiet."""

from __future__ import annotations

import logging
import multiprocessing
import subprocess
import sys
from pathlib import Path

from rlhf_demo.modeling.quantized import CPU_OPS_LOGGER
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


def test_importing_bitsandbytes_says_nothing_about_the_optional_kernels_package():
    """On AVX512-BF16 CPUs bitsandbytes tries the optional ``kernels`` package at import and
    warns on every start when it is not installed; its own CPU kernel serves instead."""
    code = "import rlhf_demo.modeling, peft, bitsandbytes"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert "kernels" not in done.stderr + done.stdout


def test_other_kernel_failures_are_still_reported():
    record = logging.LogRecord(
        CPU_OPS_LOGGER,
        logging.WARNING,
        "ops.py",
        1,
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s.",
        (RuntimeError("bad kernel"),),
        None,
    )
    missing = ModuleNotFoundError("No module named 'kernels'", name="kernels")
    assert logging.getLogger(CPU_OPS_LOGGER).filter(record)
    record.args = (missing,)
    assert not logging.getLogger(CPU_OPS_LOGGER).filter(record)

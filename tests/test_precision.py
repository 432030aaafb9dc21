"""``--quantization auto`` on CPU: decided by the CPU's NF4 kernel and the free memory, cached."""

from __future__ import annotations

import json

from rlhf_demo.modeling.precision import CACHE_FILE, choose_cpu_quantization, fp32_bytes

EPYC = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2 fma\n"
XEON = "model name\t: Intel Xeon Platinum 8480\nflags\t\t: fpu avx avx2 avx512f avx512_bf16 amx_bf16\n"


def fake_proc(tmp_path, cpuinfo: str, free_kib: int):
    proc = tmp_path / "proc"
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "cpuinfo").write_text(cpuinfo)
    (proc / "meminfo").write_text(f"MemTotal: {2 * free_kib} kB\nMemAvailable: {free_kib} kB\n")
    return proc


def test_a_cpu_without_avx512_bf16_serves_fp32_and_one_with_it_nf4(tiny_model_dir, tmp_path):
    plenty = 16 * 1024 * 1024
    amd = choose_cpu_quantization(tiny_model_dir, tmp_path / "a", fake_proc(tmp_path / "a", EPYC, plenty))
    intel = choose_cpu_quantization(tiny_model_dir, tmp_path / "b", fake_proc(tmp_path / "b", XEON, plenty))
    assert (amd.quantization, intel.quantization) == ("fp32", "nf4")
    assert "AMD EPYC" in amd.reason and "AVX512-BF16" in amd.reason


def test_a_model_too_big_for_fp32_in_ram_stays_nf4(tiny_model_dir, tmp_path):
    free_kib = fp32_bytes(tiny_model_dir) // 1024  # the fp32 weights would take all free memory
    choice = choose_cpu_quantization(tiny_model_dir, tmp_path, fake_proc(tmp_path, EPYC, free_kib))
    assert choice.quantization == "nf4" and "memory" in choice.reason


def test_the_decision_is_cached_in_the_data_dir_and_redone_for_another_cpu(tiny_model_dir, tmp_path):
    proc = fake_proc(tmp_path, EPYC, 16 * 1024 * 1024)
    first = choose_cpu_quantization(tiny_model_dir, tmp_path / "data", proc)
    cached = json.loads((tmp_path / "data" / CACHE_FILE).read_text())
    assert cached["quantization"] == first.quantization == "fp32"
    (tmp_path / "data" / CACHE_FILE).write_text(json.dumps({**cached, "reason": "from the cache"}))
    assert choose_cpu_quantization(tiny_model_dir, tmp_path / "data", proc).reason == "from the cache"
    fake_proc(tmp_path, XEON, 16 * 1024 * 1024)  # the data dir moved to another machine
    assert choose_cpu_quantization(tiny_model_dir, tmp_path / "data", proc).quantization == "nf4"


def test_auto_shows_its_reason_in_the_model_description(tiny_model_dir, tmp_path):
    from rlhf_demo.config import load_settings
    from rlhf_demo.modeling import load_model

    loaded = load_model(load_settings(env={}, model=str(tiny_model_dir), data_dir=tmp_path, quantization="auto"))
    assert loaded.quantization in ("nf4", "fp32")
    assert "(auto: " in loaded.describe() and (tmp_path / CACHE_FILE).exists()

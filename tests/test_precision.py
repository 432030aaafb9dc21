"""``--quantization auto`` on CPU: the fastest candidate measured on the machine at hand, cached."""

from __future__ import annotations

import json

import pytest

from rlhf_demo.modeling import precision
from rlhf_demo.modeling.precision import CACHE_FILE, candidates, choose_cpu_quantization, decide, fp32_bytes

EPYC = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2 fma\n"
XEON = "model name\t: Intel Xeon Platinum 8480\nflags\t\t: fpu avx avx2 avx512f avx512_bf16 amx_bf16\n"
PLENTY_KIB = 16 * 1024 * 1024


def fake_proc(tmp_path, cpuinfo: str, free_kib: int = PLENTY_KIB):
    proc = tmp_path / "proc"
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "cpuinfo").write_text(cpuinfo)
    (proc / "meminfo").write_text(f"MemTotal: {2 * free_kib} kB\nMemAvailable: {free_kib} kB\n")
    return proc


class FakeMeter:
    """Given decode speeds instead of a timed decode; counts what it was asked to measure."""

    def __init__(self, figures: dict[str, float]) -> None:
        self.figures, self.asked = figures, []

    def __call__(self, model_dir, names: list[str]) -> dict[str, float]:
        self.asked.extend(names)
        return {name: self.figures[name] for name in names}


@pytest.mark.parametrize(
    "figures, fastest",
    [
        ({"fp32": 15.0, "bf16": 21.0, "nf4": 12.5}, "bf16"),
        ({"fp32": 15.0, "bf16": 9.0, "nf4": 23.8}, "nf4"),
        ({"fp32": 14.7, "bf16": 6.0, "nf4": 7.1}, "fp32"),
    ],
)
def test_the_choice_is_the_fastest_of_the_measured_figures_and_says_them(figures, fastest):
    choice = decide(figures, key="k")
    assert choice.quantization == fastest
    assert choice.figures == figures
    assert all(f"{name} {speed:.1f}" in choice.reason for name, speed in figures.items())


def test_first_start_measures_each_candidate_and_the_second_uses_the_cache(tiny_model_dir, tmp_path):
    proc = fake_proc(tmp_path, EPYC)
    meter = FakeMeter({"fp32": 15.0, "bf16": 21.0, "nf4": 12.5})
    first = choose_cpu_quantization(tiny_model_dir, tmp_path / "data", proc, meter)
    assert first.quantization == "bf16" and set(meter.asked) == set(candidates(1, None, precision.nf4_loads()))
    cached = json.loads((tmp_path / "data" / CACHE_FILE).read_text())
    assert cached["quantization"] == "bf16" and cached["figures"]["bf16"] == 21.0

    meter.asked.clear()
    again = choose_cpu_quantization(tiny_model_dir, tmp_path / "data", proc, meter)
    assert again == first and meter.asked == []


def test_another_cpu_measures_again(tiny_model_dir, tmp_path):
    proc = fake_proc(tmp_path, EPYC)
    choose_cpu_quantization(tiny_model_dir, tmp_path / "data", proc, FakeMeter({"fp32": 15.0, "bf16": 9.0, "nf4": 7.0}))
    fake_proc(tmp_path, XEON)  # the data dir moved to another machine
    meter = FakeMeter({"fp32": 15.0, "bf16": 9.0, "nf4": 23.8})
    assert choose_cpu_quantization(tiny_model_dir, tmp_path / "data", proc, meter).quantization == "nf4"
    assert meter.asked


def test_precisions_that_do_not_fit_the_free_memory_together_are_not_tried(tiny_model_dir):
    weights = fp32_bytes(tiny_model_dir)  # all three side by side: 1.65x the fp32 weights
    assert candidates(weights, available=4 * weights, nf4_available=True) == ["nf4", "bf16", "fp32"]
    assert candidates(weights, available=2 * weights, nf4_available=True) == ["nf4", "bf16"]
    assert candidates(weights, available=weights // 10, nf4_available=False) == ["nf4"]
    assert candidates(weights, available=None, nf4_available=False) == ["bf16", "fp32"]


def test_auto_measures_once_and_shows_its_figures_in_the_model_description(tiny_model_dir, tmp_path):
    from rlhf_demo.config import load_settings
    from rlhf_demo.modeling import load_model

    settings = load_settings(env={}, model=str(tiny_model_dir), data_dir=tmp_path, quantization="auto")
    loaded = load_model(settings)
    recorded = json.loads((tmp_path / CACHE_FILE).read_text())
    assert loaded.quantization == recorded["quantization"] == max(recorded["figures"], key=recorded["figures"].get)
    assert "(auto: fastest measured here" in loaded.describe()
    if loaded.quantization == "bf16":
        import torch

        assert loaded.compute_dtype == torch.bfloat16


def test_an_explicit_precision_skips_the_measurement(tiny_model_dir, tmp_path, monkeypatch):
    from rlhf_demo.config import load_settings
    from rlhf_demo.modeling import load_model

    def refuse(*args, **kwargs):
        raise AssertionError("an explicit --quantization must not measure")

    monkeypatch.setattr(precision, "choose_cpu_quantization", refuse)
    loaded = load_model(load_settings(env={}, model=str(tiny_model_dir), data_dir=tmp_path, quantization="fp32"))
    assert loaded.quantization == "fp32" and "auto" not in loaded.describe()
    assert not (tmp_path / CACHE_FILE).exists()


def test_only_a_one_token_bfloat16_cpu_step_leaves_onednn_and_the_switch_comes_back(tiny_model_dir):
    import torch

    from rlhf_demo.modeling.loading import load_base
    from rlhf_demo.modeling.precision import matmul_kernels

    bf16 = load_base(tiny_model_dir, "bf16", torch.bfloat16, "cpu")
    fp32 = load_base(tiny_model_dir, "fp32", torch.float32, "cpu")
    before = torch.backends.mkldnn.enabled
    seen = {}
    for name, model, tokens in (("bf16 step", bf16, 1), ("bf16 prefill", bf16, 8), ("fp32 step", fp32, 1)):
        with matmul_kernels(model, tokens):
            seen[name] = torch.backends.mkldnn.enabled
    assert seen == {"bf16 step": False, "bf16 prefill": before, "fp32 step": before}
    with pytest.raises(RuntimeError), matmul_kernels(bf16, 1):
        raise RuntimeError("a failing forward")
    assert torch.backends.mkldnn.enabled == before

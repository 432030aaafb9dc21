"""``--quantization auto`` for serving on CPU: the precision that decodes fastest here, measured.

CPU flags do not predict decode speed: on one AVX512-BF16 EPYC, NF4 once decoded SmolLM2 at
23.8 tok/s vs 16.0 for float32, and later, on the same kind of machine, 12.5 vs 15.0
(docs/precision.md). So at first start each candidate (float32, bfloat16, NF4 where
bitsandbytes loads) decodes a few tokens with the model at hand, one row, greedy, and the
fastest wins. The figures, the choice and its key (CPU, model, library versions, threads) are
cached in the data dir and shown in the header; a different key measures again. A candidate
whose weights would take more than half the free memory is not tried.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_FILE = "precision.json"
RAM_SHARE = 0.5  # a candidate's weights may take at most this share of the available memory
BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "nf4": 0.6}  # NF4: 4 bits + block scales
DECODE_TOKENS = 12  # timed decode steps per try, after a warm-up (NF4 repacks on its first forward)
TRIES = 3  # per candidate, in turns; the best try counts (a busy CPU only ever slows a try down)


@dataclass(frozen=True)
class PrecisionChoice:
    quantization: str  # "fp32" | "bf16" | "nf4"
    reason: str
    key: str  # what the decision depends on; a different key measures again
    figures: dict[str, float] = field(default_factory=dict)  # decode tok/s per candidate measured here


def cpu_name(cpuinfo: str) -> str:
    """The model name of the first CPU in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name":
            return value.strip()
    return "unknown CPU"


def available_bytes(meminfo: str) -> int | None:
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def fp32_bytes(model_dir: Path) -> int:
    """Float32 size of the weights, from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                count = 1
                for dim in f.get_slice(key).get_shape():
                    count *= int(dim)
                total += 4 * count
    return total


def candidates(weights_fp32: int, available: int | None, nf4_available: bool) -> list[str]:
    """The precisions worth timing here, smallest first while all of them together fit in the
    memory share (they are loaded side by side, to be timed in turns)."""
    found, total = [], 0.0
    for name in sorted(BYTES_PER_WEIGHT, key=BYTES_PER_WEIGHT.get):  # type: ignore[arg-type]
        if name == "nf4" and not nf4_available:
            continue
        total += weights_fp32 * BYTES_PER_WEIGHT[name] / 4
        if available is not None and total > RAM_SHARE * available:
            break
        found.append(name)
    return found or ["nf4"]


def decide(figures: dict[str, float], key: str) -> PrecisionChoice:
    """The rule, pure: the fastest measured candidate."""
    fastest = max(figures, key=lambda name: figures[name])
    measured = ", ".join(f"{name} {speed:.1f}" for name, speed in sorted(figures.items(), key=lambda kv: -kv[1]))
    return PrecisionChoice(fastest, f"fastest measured here, decode tok/s: {measured}", key, dict(figures))


@contextmanager
def matmul_kernels(model: Any, tokens: int) -> Iterator[None]:
    """Run a forward of ``tokens`` positions on the CPU kernels that are fastest for it.

    A one-token bfloat16 step (one visitor decoding) is a matrix-vector product per layer:
    oneDNN repacks the weights on every call and was no faster than float32, while ATen's own
    bfloat16 kernel reads the weights once, 1.9x faster than float32 over the whole step. From 4
    rows on, and for prefills (compute-bound), oneDNN's AVX512-BF16 path wins (1.3-1.8x float32)
    and stays on (docs/serving.md). The switch is process-wide: only the decode thread runs
    forwards on the serving model, and other work meanwhile only runs slower, never wrong.
    """
    import torch

    native = tokens == 1 and model.dtype == torch.bfloat16 and model.device.type == "cpu"
    if not native:
        yield
        return
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # a settable flag at run time
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def decode_speed(model: Any, tokens: int = DECODE_TOKENS) -> float:
    """Tokens/s of a one-row greedy decode with a KV cache (what one visitor waits for)."""
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache()
        ids = torch.arange(1, 9)[None] % model.config.vocab_size  # a short prompt: decode speed is the measure
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        started = None
        for step in range(tokens + 1):  # step 0 warms up
            if step == 1:
                started = time.perf_counter()
            with matmul_kernels(model, 1):  # the engine's kernels for a one-row step
                out = model(input_ids=next_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        assert started is not None
        return tokens / (time.perf_counter() - started)


def measure(model_dir: Path, names: list[str]) -> dict[str, float]:
    """Load the base at each precision (its default CPU compute dtype) and time short decodes in
    turns, best of :data:`TRIES` each: a CPU whose load drifts slows every candidate alike."""
    import gc

    from rlhf_demo.config import resolve_precision
    from rlhf_demo.modeling.loading import load_base, torch_dtype

    models = {name: load_base(model_dir, name, torch_dtype(resolve_precision(name, "auto", "cpu")[1]), "cpu") for name in names}
    figures = dict.fromkeys(names, 0.0)
    for _ in range(TRIES):
        for name, model in models.items():
            figures[name] = max(figures[name], decode_speed(model))
    del models
    gc.collect()
    return figures


def nf4_loads() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no NF4 here
        return False
    return True


def cache_key(cpu: str, model_dir: Path, weights: int) -> str:
    import torch

    try:
        from importlib.metadata import version

        bnb = version("bitsandbytes")
    except Exception:  # noqa: BLE001 - not installed
        bnb = "none"
    return json.dumps([cpu, str(model_dir.resolve()), weights, torch.__version__, bnb, torch.get_num_threads()])


def choose_cpu_quantization(
    model_dir: Path, data_dir: Path, proc: Path = Path("/proc"), measure: Callable[[Path, list[str]], dict[str, float]] = measure
) -> PrecisionChoice:
    """The cached choice for this CPU and model, or a new one measured now (written to the data dir)."""
    cpuinfo = (proc / "cpuinfo").read_text() if (proc / "cpuinfo").exists() else ""
    meminfo = (proc / "meminfo").read_text() if (proc / "meminfo").exists() else ""
    weights = fp32_bytes(model_dir)
    key = cache_key(cpu_name(cpuinfo), model_dir, weights)
    cache = data_dir / CACHE_FILE
    try:
        cached = PrecisionChoice(**json.loads(cache.read_text()))
        if cached.key == key and cached.figures:
            return cached
    except (OSError, ValueError, TypeError):
        pass  # no cache or a stale/garbled one: measure again
    names = candidates(weights, available_bytes(meminfo), nf4_loads())
    started = time.perf_counter()
    choice = decide(measure(model_dir, names), key)
    log.info(
        "quantization auto on CPU: %s (%s; measured in %.1f s)", choice.quantization, choice.reason, time.perf_counter() - started
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(choice)))
    tmp.replace(cache)
    return choice

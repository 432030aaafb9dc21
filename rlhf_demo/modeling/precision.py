"""``--quantization auto`` for serving on CPU: NF4 or float32, decided for the machine at hand.

bitsandbytes' packed NF4 kernel is fast only where the CPU has AVX512-BF16: there NF4 decoded
SmolLM2 at 23.8 tok/s vs 16.0 for float32; on an AVX2-only AMD EPYC the same bench gave fp32
14.7 vs NF4 7.1 tok/s (docs/precision.md, issue 10). A model whose float32 weights would not fit
comfortably in RAM stays NF4 whatever the CPU. The decision and its reason are cached in the
data dir (keyed by CPU, model and library versions) and shown in the header.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_FILE = "precision.json"
RAM_SHARE = 0.5  # float32 weights may take at most this share of the available memory


@dataclass(frozen=True)
class PrecisionChoice:
    quantization: str  # "nf4" | "fp32"
    reason: str
    key: str  # what the decision depends on; a different key decides again


def cpu_flags(cpuinfo: str) -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU in a /proc/cpuinfo text."""
    name, flags = "unknown CPU", set()
    for line in cpuinfo.splitlines():
        field, _, value = line.partition(":")
        if field.strip() == "model name" and name == "unknown CPU":
            name = value.strip()
        elif field.strip() == "flags" and not flags:
            flags = set(value.split())
    return name, flags


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
                shape = f.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= int(dim)
                total += 4 * count
    return total


def decide(cpu_name: str, flags: set[str], weights_fp32: int, available: int | None, key: str) -> PrecisionChoice:
    """The rule, pure: memory first, then the CPU's NF4 kernel."""
    gib = 1024**3
    if available is not None and weights_fp32 > RAM_SHARE * available:
        return PrecisionChoice("nf4", f"float32 weights ({weights_fp32 / gib:.1f} GiB) would exceed half the free memory ({available / gib:.1f} GiB)", key)
    if "avx512_bf16" in flags:
        return PrecisionChoice("nf4", f"{cpu_name} has AVX512-BF16, where bitsandbytes' NF4 kernel decodes faster than float32", key)
    return PrecisionChoice("fp32", f"{cpu_name} lacks AVX512-BF16: bitsandbytes' NF4 kernel decodes about 2x slower than float32 there", key)


def choose_cpu_quantization(model_dir: Path, data_dir: Path, proc: Path = Path("/proc")) -> PrecisionChoice:
    """The cached decision for this CPU and model, or a new one (written to the data dir)."""
    import bitsandbytes
    import torch

    cpuinfo = (proc / "cpuinfo").read_text() if (proc / "cpuinfo").exists() else ""
    meminfo = (proc / "meminfo").read_text() if (proc / "meminfo").exists() else ""
    name, flags = cpu_flags(cpuinfo)
    weights = fp32_bytes(model_dir)
    key = json.dumps([name, "avx512_bf16" in flags, str(model_dir.resolve()), weights, torch.__version__, bitsandbytes.__version__])
    cache = data_dir / CACHE_FILE
    try:
        cached = PrecisionChoice(**json.loads(cache.read_text()))
        if cached.key == key:
            return cached
    except (OSError, ValueError, TypeError):
        pass  # no cache or a stale/garbled one: decide again
    choice = decide(name, flags, weights, available_bytes(meminfo), key)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(choice)))
    tmp.replace(cache)
    log.info("quantization auto on CPU: %s (%s)", choice.quantization, choice.reason)
    return choice

"""NF4 (bitsandbytes) bases that are trained through: keep the backward pass correct on CPU."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"


def _not_the_missing_kernels_package(record: logging.LogRecord) -> bool:
    """False for bitsandbytes' import-time warning that the optional ``kernels`` package is not
    installed: on AVX512-BF16 CPUs it tries that package's faster 4-bit kernel (fetched from
    the Hub) and falls back to its own, which serves correctly. Any other failure stays."""
    args = record.args if isinstance(record.args, tuple) else ()
    missing = any(isinstance(a, ModuleNotFoundError) and a.name == "kernels" for a in args)
    return not (missing and str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"))


def quiet_missing_cpu_kernels() -> None:
    """Drop only that warning (a filter on bitsandbytes' CPU-ops logger; call before anything
    imports bitsandbytes: peft and transformers do when it is installed). Idempotent."""
    logger = logging.getLogger(CPU_OPS_LOGGER)
    if _not_the_missing_kernels_package not in logger.filters:
        logger.addFilter(_not_the_missing_kernels_package)


def _four_bit_layers(model: Any) -> list[torch.nn.Module]:
    """The bitsandbytes ``Linear4bit`` layers of an NF4 base (none for fp32/bf16)."""
    bnb = sys.modules.get("bitsandbytes")  # imported by transformers for quantized models
    if bnb is None:
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def keep_4bit_differentiable(model: Any) -> None:
    """Make NF4 layers always take bitsandbytes' differentiable (dequantize + matmul) path.

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight, in place, for
    an inference kernel on its first eval-mode forward without grad; that kernel has no
    backward, so later gradients through the layer are silently wrong. Turn the repacking
    off for good (once per layer, for every user of the shared base) and undo a packing
    already done, with bitsandbytes' own inverse (it re-quantizes the absmax: ~1% logit
    change, once). No effect on CUDA, where this repacking does not exist.
    """
    for m in _four_bit_layers(model):
        if getattr(m, "support_avx512bf16_for_cpu", False):
            setattr(m, "support_avx512bf16_for_cpu", False)  # noqa: B010 - a bitsandbytes instance flag
        weight: Any = m.weight  # bitsandbytes Params4bit
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)

"""Base model loading, the tiny test model, LoRA adapters and scalar heads."""

from rlhf_demo.modeling.loading import LoadedModel, ModelSource, ModelUnavailableError, load_model
from rlhf_demo.modeling.quantized import quiet_missing_cpu_kernels

quiet_missing_cpu_kernels()  # before peft / transformers import bitsandbytes

__all__ = ["LoadedModel", "ModelSource", "ModelUnavailableError", "load_model"]

"""Base model loading, the tiny test model, LoRA adapters and scalar heads."""

from rlhf_demo.modeling.loading import LoadedModel, ModelSource, ModelUnavailableError, load_model

__all__ = ["LoadedModel", "ModelSource", "ModelUnavailableError", "load_model"]

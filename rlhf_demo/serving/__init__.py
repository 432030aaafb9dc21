"""Serving: one interface (:class:`ServingEngine`) that the UI, benches and runtime generate
through; the embedded :class:`PolicyServer` (an adapter slot pool, :mod:`.slots`, and a
generation engine, :mod:`.engine`) and the vLLM client (:mod:`.vllm_engine`) implement it."""

from rlhf_demo.serving.interface import EngineError, ServingEngine
from rlhf_demo.serving.prompts import PromptBudget, PromptRefused
from rlhf_demo.serving.sampling import Generation, Sampling, strip_control
from rlhf_demo.serving.server import PolicyServer
from rlhf_demo.serving.slots import BASE_VERSION, slot_key

__all__ = [
    "BASE_VERSION",
    "EngineError",
    "Generation",
    "PolicyServer",
    "PromptBudget",
    "PromptRefused",
    "Sampling",
    "ServingEngine",
    "slot_key",
    "strip_control",
]

"""Serving: an adapter slot pool (:mod:`.slots`) and a generation engine (:mod:`.engine`)
behind :class:`PolicyServer`, the one object the UI, benches and trainers generate through."""

from rlhf_demo.serving.prompts import PromptBudget, PromptRefused
from rlhf_demo.serving.sampling import Generation, Sampling, strip_control
from rlhf_demo.serving.server import PolicyServer
from rlhf_demo.serving.slots import BASE_VERSION, slot_key

__all__ = ["BASE_VERSION", "Generation", "PolicyServer", "PromptBudget", "PromptRefused", "Sampling", "slot_key", "strip_control"]

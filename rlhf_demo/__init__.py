"""rlhf-demo: a live RLHF chat that learns from its users' votes."""

__version__ = "0.1.0"

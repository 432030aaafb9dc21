"""Scalar heads on the shared base's hidden states: reward model and value function.

A head is one ``nn.Linear(hidden, 1)`` kept in float32 whatever the base's storage (NF4
included), saved as safetensors beside its adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

HEAD_FILE = "head.safetensors"


class ScalarHead(nn.Module):
    """hidden (…, H) -> score (…,); small init so a fresh head starts near 0 (neutral)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(Path(folder) / HEAD_FILE))

    @classmethod
    def load(cls, folder: Path, hidden_size: int) -> ScalarHead:
        from safetensors.torch import load_file

        head = cls(hidden_size)
        head.load_state_dict(load_file(str(Path(folder) / HEAD_FILE)))
        return head


def last_token_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state (B, H) of each row's last non-pad token (works with left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def hidden_size(model: Any) -> int:
    config = model.config
    return int(getattr(config, "hidden_size", None) or config.get_text_config().hidden_size)

"""The dense non-gated relu2 MLP: down(relu(up(x))**2). Also the shape of every MoE expert."""
from __future__ import annotations

import torch
from torch import nn

from nemoh.models.linear import Linear


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x).square()


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (num_tokens, hidden) -> (num_tokens, hidden)."""
        return self.down_proj(relu2(self.up_proj(x)))

"""RMSNorm and the gated grouped RMSNorm of the Mamba-2 mixer (REFERENCE §1, Mamba step 5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., hidden). Normalised in fp32, scaled in fp32, cast back (as the reference does)."""
        # one fused kernel instead of six elementwise passes: it matters in decode, where a norm costs
        # per-operator overhead, not arithmetic
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class GatedGroupRMSNorm(nn.Module):
    """y = rmsnorm_per_group(y * silu(z)) * weight, the gate applied before normalisation."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z: (num_tokens, d_inner) -> (num_tokens, d_inner) in y's dtype."""
        dtype = y.dtype
        y = y.float() * F.silu(z.float())
        shape = y.shape
        y = F.rms_norm(y.view(*shape[:-1], shape[-1] // self.group_size, self.group_size), (self.group_size,),
                       eps=self.eps)
        return self.weight * y.view(shape).to(dtype)

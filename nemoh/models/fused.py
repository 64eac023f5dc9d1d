"""Parameters that share one tensor, so that a single matmul can use them all without copying them.

The checkpoint keeps q/k/v and every expert as separate tensors (the Hugging Face layout the loader reads);
inference wants them side by side. `SharedWeight.get(params)` builds the combined tensor once and re-points
each parameter at its slice of it, so the model holds one copy. It rebuilds when a parameter no longer
lives in the combined tensor (after `.to()`, a reload, or anything else that replaced its storage).
"""
from __future__ import annotations

import torch
from torch import nn


class SharedWeight:
    def __init__(self, stack: bool):
        self.stack = stack                  # True: (n, *shape) by torch.stack; False: torch.cat on dim 0
        self.whole: torch.Tensor | None = None
        self.pointers: list[int] = []

    def get(self, params: list[nn.Parameter]) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # a compiled graph reads the combined tensor built before compilation (storage pointers are not
            # traceable), or combines the parameters itself
            if self.whole is not None:
                return self.whole
            return torch.stack(params) if self.stack else torch.cat(params)
        if self.whole is None or [p.data_ptr() for p in params] != self.pointers:
            with torch.no_grad():
                parts = [p.detach() for p in params]
                whole = torch.stack(parts) if self.stack else torch.cat(parts)
                offset = 0
                for i, p in enumerate(params):
                    if self.stack:
                        p.data = whole[i]
                    else:
                        p.data = whole[offset:offset + p.shape[0]]
                        offset += p.shape[0]
            self.whole = whole
            self.pointers = [p.data_ptr() for p in params]
        return self.whole

"""The vocabulary-parallel embedding; the other layers need no parallel class of their own (their per-rank
shapes come from `ParallelLayout.local_config`, and the layer loop sums their partial outputs)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemoh.distributed.collectives import TPGroup


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + rows) of the embedding matrix (`weight` keeps the checkpoint's name). A token outside
    this rank's rows looks up zeros; the all-reduce adds the one rank's row that holds it."""

    def __init__(self, rows: int, hidden_size: int, start: int, tp: TPGroup):
        super().__init__(rows, hidden_size)
        self.start = start
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (num_tokens,) global ids -> (num_tokens, hidden), the same on every rank."""
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        out = out * inside[..., None].to(out.dtype)
        return self.tp.all_reduce(out)

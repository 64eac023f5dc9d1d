"""The two collectives tensor parallelism needs, over one process group, with what they cost counted.

- `all_reduce(x)`: every layer's partial output (a row-parallel projection's, or a rank's experts') summed in place.
- `gather_vocab(logits)`: each rank's vocabulary slice of the logits (n, V/N) -> the full (n, V) on every rank.

`stats` counts calls, bytes sent per rank (the payload of each call) and seconds spent inside the calls, so that
benchmarks/parallel.py reports the communication of the same code path the model runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def reset(self) -> None:
        self.calls, self.bytes, self.seconds = 0, 0, 0.0


class TPGroup:
    """A tensor-parallel group: rank, size and the collectives (one instance shared by every layer of a model)."""

    def __init__(self, group: dist.ProcessGroup | None = None, vocab_size: int | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.vocab_size = vocab_size
        self.stats = CommStats()    # seconds: host time inside the calls (on a GPU, NCCL's launch only)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x: a partial sum (any shape) -> the sum over ranks, in place."""
        start = self._start()
        dist.all_reduce(x, group=self.group)
        self._count(x.numel() * x.element_size(), start)
        return x

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (n, rows per rank) of this rank's vocabulary slice -> (n, vocab_size)."""
        start = self._start()
        parts = [torch.empty_like(logits) for _ in range(self.world_size)]
        dist.all_gather(parts, logits.contiguous(), group=self.group)
        self._count(logits.numel() * logits.element_size(), start)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]

    def _start(self) -> float:
        return time.perf_counter()

    def _count(self, nbytes: int, start: float) -> None:
        self.stats.calls += 1
        self.stats.bytes += nbytes
        self.stats.seconds += time.perf_counter() - start

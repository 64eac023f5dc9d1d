"""Mamba state slots: each running sequence owns one slot holding its conv and SSM state in every Mamba layer.

Unlike KV blocks the state does not grow with the sequence, so a sequence needs exactly one slot from its
first prefill chunk until it finishes or is preempted. The verbs match `BlockManager`.

The lowest free slot is handed out first, so that the running sequences' slots stay close together: a decode
step then updates their states as one view of the cache instead of gathering and scattering them
(`ForwardContext.mamba_decode_slot_window`).

With prefix caching the pool has a second part, snapshot slots: copies of states at cached resume points
(nemoh.engine.prefix_cache), a budget of their own (`mamba_cache_snapshots`), placed after the running slots
(and after the runner's padding slot) so that they never come between the running ones.
"""
from __future__ import annotations

import heapq

import torch

from nemoh.engine.sequence import Sequence


class StateCache:
    """Counters: num_used_slots + num_free_slots = num_slots (running sequences); num_used_snapshot_slots +
    free snapshot slots = num_snapshot_slots (resume points)."""

    def __init__(self, num_slots: int, num_snapshot_slots: int = 0, first_snapshot_slot: int | None = None):
        if num_slots < 1:
            raise ValueError(f"StateCache: num_slots must be >= 1, got {num_slots}")
        if num_snapshot_slots < 0:
            raise ValueError(f"StateCache: num_snapshot_slots must be >= 0, got {num_snapshot_slots}")
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots))       # a heap
        self.num_snapshot_slots = num_snapshot_slots
        first = num_slots if first_snapshot_slot is None else first_snapshot_slot
        if first < num_slots:
            raise ValueError(f"StateCache: snapshot slots must come after the {num_slots} running slots")
        self._free_snapshots: list[int] = list(range(first + num_snapshot_slots - 1, first - 1, -1))

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def num_used_slots(self) -> int:
        return self.num_slots - len(self._free)

    def can_allocate(self, seq: Sequence) -> bool:
        return seq.state_slot is not None or bool(self._free)

    def allocate(self, seq: Sequence) -> None:
        if seq.state_slot is not None:
            return
        if not self._free:
            raise RuntimeError("StateCache: no free slot")
        seq.state_slot = heapq.heappop(self._free)

    def append(self, seq: Sequence) -> None:
        """The state has a fixed size: growing a sequence needs nothing."""

    def free(self, seq: Sequence) -> None:
        if seq.state_slot is not None:
            heapq.heappush(self._free, seq.state_slot)
            seq.state_slot = None

    # ---- snapshot slots (prefix caching) --------------------------------------------------------------------
    @property
    def num_used_snapshot_slots(self) -> int:
        return self.num_snapshot_slots - len(self._free_snapshots)

    def allocate_snapshot(self) -> int | None:
        """A free snapshot slot, or None when all are taken."""
        return self._free_snapshots.pop() if self._free_snapshots else None

    def free_snapshot(self, slot: int) -> None:
        self._free_snapshots.append(slot)


def state_bytes_per_slot(num_mamba_layers: int, conv_dim: int, conv_kernel: int, num_heads: int,
                         head_dim: int, state_size: int, conv_dtype: torch.dtype, ssm_dtype: torch.dtype) -> int:
    conv = conv_dim * (conv_kernel - 1) * torch.empty((), dtype=conv_dtype).element_size()
    ssm = num_heads * head_dim * state_size * torch.empty((), dtype=ssm_dtype).element_size()
    return num_mamba_layers * (conv + ssm)


def allocate_mamba_caches(layer_ids: list[int], num_slots: int, conv_dim: int, conv_kernel: int,
                          num_heads: int, head_dim: int, state_size: int, conv_dtype: torch.dtype,
                          ssm_dtype: torch.dtype, device: torch.device | str
                          ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer_idx: (conv_state (num_slots, conv_dim, conv_kernel-1), ssm_state (num_slots, H, P, N))}."""
    return {
        i: (torch.zeros(num_slots, conv_dim, conv_kernel - 1, dtype=conv_dtype, device=device),
            torch.zeros(num_slots, num_heads, head_dim, state_size, dtype=ssm_dtype, device=device))
        for i in layer_ids
    }

"""Paged KV cache: fixed-size blocks handed out to sequences, plus the per-layer cache tensors.

Every attention layer (main model and MTP block) shares one block table per sequence: block b of the
sequence holds its tokens b*block_size ... (b+1)*block_size-1 in every layer's cache. Blocks are only
counted here; the tensors are indexed by the model through `ForwardContext.slot_mapping/block_tables`.
"""
from __future__ import annotations

from collections import deque

import torch

from nemoh.engine.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    """Hands out KV blocks. Verbs shared with `StateCache`: can_allocate / allocate / append / free."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"BlockManager: num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def num_missing(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still needs so that its table covers `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_missing(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` to cover `num_tokens` tokens (a no-op when it already does)."""
        missing = self.num_missing(seq, num_tokens)
        if missing > len(self._free):
            raise RuntimeError(f"BlockManager: {missing} blocks needed, {len(self._free)} free")
        seq.block_table.extend(self._free.popleft() for _ in range(missing))

    append = allocate   # growing by the next step's tokens is the same operation

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []

    def slot(self, seq: Sequence, position: int) -> int:
        """The flat cache slot of token `position` of `seq`."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    if name == "auto":
        return model_dtype
    if name == "fp8":
        return torch.float8_e4m3fn
    return getattr(torch, name)


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    """K and V of one block over all `num_layers` attention layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def allocate_kv_caches(layer_ids: list[int], num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: torch.dtype, device: torch.device | str
                       ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer_idx: (k_cache, v_cache)}, each (num_blocks, block_size, num_kv_heads, head_dim)."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return {i: (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for i in layer_ids}

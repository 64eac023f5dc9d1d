"""Paged KV cache: fixed-size blocks handed out to sequences, plus the per-layer cache tensors.

Every attention layer (main model and MTP block) shares one block table per sequence: block b of the
sequence holds its tokens b*block_size ... (b+1)*block_size-1 in every layer's cache. Blocks are only
counted here; the tensors are indexed by the model through `ForwardContext.slot_mapping/block_tables`.

With prefix caching (nemoh.engine.prefix_cache) a block can be shared. Each block counts the sequences whose
block table holds it and the cached resume points that hold it (`hold` / `release`); it is free when neither
does. Every full block a sequence has computed is registered under the chained hash of the tokens up to its
end, so `num_cached_prefix_blocks` tells how much of a new prompt's KV is already somewhere in the cache. A
freed block keeps its hash until it is handed out again: blocks without a hash are handed out first, then the
hashed ones, freed longest ago first (LRU). Blocks held by resume points only (`num_cached_blocks`) count as
available: an allocation that needs them has the prefix cache evict resume points, least recently used first
(`reclaim`), so the cache never makes a request wait or fail. A shared block is never written: the one block
a resumed sequence goes on writing into is copied first (`copy_on_write`).
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from nemoh.engine.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    """Hands out KV blocks. Verbs shared with `StateCache`: can_allocate / allocate / append / free.

    Counters: num_used_blocks (in some sequence's block table) + num_cached_blocks (held by resume points
    only) + num_free_blocks = num_blocks, always.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"BlockManager: num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))    # handed out from the left
        self._seq_refs = [0] * num_blocks                      # block tables holding the block
        self._cache_refs = [0] * num_blocks                    # resume points holding the block
        self._num_cache_only = 0                               # blocks with cache refs and no sequence refs
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        # Frees at least n blocks by evicting cached resume points (set by the prefix cache, when there is one).
        self.reclaim: Callable[[int], None] | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return self._num_cache_only

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free) - self._num_cache_only

    def num_missing(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still needs so that its table covers `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int, shared: list[int] | None = None,
                     num_copies: int = 0) -> bool:
        """Whether `seq` can cover `num_tokens` tokens, after first taking the cached blocks `shared` (a prefix
        hit; they no longer count as reclaimable once the sequence holds them) and `num_copies` more blocks
        for copies of shared ones (`copy_on_write`)."""
        shared = shared or []
        taken = sum(1 for b in shared if self._seq_refs[b] == 0)
        missing = max(0, self.num_missing(seq, num_tokens) - len(shared)) + num_copies
        return missing <= len(self._free) + self._num_cache_only - taken

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` to cover `num_tokens` tokens (a no-op when it already does)."""
        missing = self.num_missing(seq, num_tokens)
        if missing > len(self._free) and self.reclaim is not None:
            self.reclaim(missing)
        if missing > len(self._free):
            raise RuntimeError(f"BlockManager: {missing} blocks needed, {len(self._free)} free")
        for _ in range(missing):
            block = self._free.popleft()
            self._forget(block)
            self._seq_refs[block] = 1
            seq.block_table.append(block)

    append = allocate   # growing by the next step's tokens is the same operation

    def free(self, seq: Sequence) -> None:
        freed = []
        for block in seq.block_table:
            self._seq_refs[block] -= 1
            if self._seq_refs[block] == 0:
                if self._cache_refs[block]:
                    self._num_cache_only += 1      # a resume point still holds it
                else:
                    freed.append(block)
        self._push_free(freed)
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def slot(self, seq: Sequence, position: int) -> int:
        """The flat cache slot of token `position` of `seq`."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    # ---- sharing (prefix caching) -------------------------------------------------------------------------
    def share(self, seq: Sequence, blocks: list[int]) -> None:
        """Append cached blocks (held by a resume point) to `seq`'s block table; they are never written."""
        for block in blocks:
            if self._seq_refs[block] == 0:
                if self._cache_refs[block] == 0:
                    raise RuntimeError(f"BlockManager: block {block} is free, it cannot be shared")
                self._num_cache_only -= 1
            self._seq_refs[block] += 1
            seq.block_table.append(block)
        seq.num_hashed_blocks = len(seq.block_table)

    def copy_on_write(self, seq: Sequence, index: int) -> tuple[int, int]:
        """Give `seq` a block of its own in place of the shared `block_table[index]`; returns (source, copy):
        the caller copies the contents. The source stays held by `seq` until the copy is allocated."""
        src = seq.block_table[index]
        if not self._free and self.reclaim is not None:
            self.reclaim(1)
        if not self._free:
            raise RuntimeError("BlockManager: no free block to copy a shared block into")
        dst = self._free.popleft()
        self._forget(dst)
        self._seq_refs[dst] = 1
        seq.block_table[index] = dst
        self._seq_refs[src] -= 1
        if self._seq_refs[src] == 0:
            if self._cache_refs[src]:
                self._num_cache_only += 1
            else:
                self._push_free([src])
        seq.num_hashed_blocks = min(seq.num_hashed_blocks, index)
        return src, dst

    def hold(self, blocks: list[int]) -> None:
        """A resume point keeps these blocks (all in use by the sequence it is taken from)."""
        for block in blocks:
            if self._seq_refs[block] == 0 and self._cache_refs[block] == 0:
                raise RuntimeError(f"BlockManager: block {block} is free, it cannot be held")
            self._cache_refs[block] += 1

    def release(self, blocks: list[int]) -> None:
        """A resume point is evicted: it no longer keeps these blocks."""
        for block in blocks:
            self._cache_refs[block] -= 1
            if self._cache_refs[block] == 0 and self._seq_refs[block] == 0:
                self._num_cache_only -= 1
                self._push_free([block])

    def _push_free(self, blocks: list[int]) -> None:
        # A block with a hash may still serve a lookup: it is handed out after the ones without, oldest first.
        # The others go first, in their order, so that one sequence's blocks stay consecutive.
        self._free.extendleft(reversed([b for b in blocks if b not in self._hash_of]))
        self._free.extend(b for b in blocks if b in self._hash_of)

    # ---- content hashes ------------------------------------------------------------------------------------
    def register(self, seq: Sequence, hashes: list[bytes], num_blocks: int) -> None:
        """Register the first `num_blocks` blocks of `seq` (fully computed) under `hashes[j]`, the chained
        hash of the tokens of blocks 0..j. A hash registered already keeps its block (this one is a copy)."""
        for j in range(seq.num_hashed_blocks, num_blocks):
            block, h = seq.block_table[j], hashes[j]
            if h not in self._by_hash and block not in self._hash_of:
                self._by_hash[h] = block
                self._hash_of[block] = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_blocks)

    def num_cached_prefix_blocks(self, hashes: list[bytes]) -> int:
        """How many leading blocks of a token sequence with these chained block hashes are in the cache."""
        n = 0
        while n < len(hashes) and hashes[n] in self._by_hash:
            n += 1
        return n

    def _forget(self, block: int) -> None:
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._by_hash[h]

    def forget_hashes(self) -> None:
        """Drop the hashes of free blocks (a reset of the prefix cache)."""
        for block in list(self._free):
            self._forget(block)

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

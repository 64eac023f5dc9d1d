"""Sort a batch's (token, expert) pairs by expert into blocks of BLOCK_M rows, on the device, without a host sync.

The fused MoE kernels (moe_triton.py) give each program one block: BLOCK_M pairs that all chose the same expert,
so the program reads that expert's weight tile once for all of them. Pair p = token * top_k + j stands for token
`token`'s j-th choice `topk_ids[token, j]`.

Output shapes depend only on (num_tokens, top_k, num_experts, BLOCK_M), never on the routing, so a captured step
(CUDA graph) can replay it for any routing of its batch bucket:

  sorted_pair_ids   int32 (max_blocks * BLOCK_M,)  the pairs, grouped by expert (ascending), each expert's group in
                                                   pair order and padded with the id num_pairs to a multiple of
                                                   BLOCK_M; entries past the valid blocks are num_pairs too
  expert_ids        int32 (max_blocks,)            the expert of each block; -1 past the valid blocks
  num_valid_blocks  int32 (1,)                     how many blocks hold pairs (a device tensor, never read on the
                                                   host); the kernels' grid is max_blocks and the rest exit at once

max_blocks bounds the valid blocks for every routing: an expert with c pairs takes ceil(c / BLOCK_M) <=
(c + BLOCK_M - 1) / BLOCK_M blocks and at most m = min(E, P) experts have pairs (P pairs), so the total is at most
(P + m * (BLOCK_M - 1)) / BLOCK_M. For Super's decode (P = 22 pairs, 512 experts, BLOCK_M 16) that is 22 blocks,
where the usual bound P + E * (BLOCK_M - 1) rows would launch 482.

Every step is a fixed-shape PyTorch op (scatter_add, cumsum, searchsorted, a stable argsort, scatter): no `.item()`,
no boolean-mask indexing, no `bincount` (whose output length on CUDA depends on the data's maximum).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoEAlignment:
    sorted_pair_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_valid_blocks: torch.Tensor
    block_m: int
    num_pairs: int

    @property
    def max_blocks(self) -> int:
        return self.expert_ids.shape[0]


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The most blocks of `block_m` rows that `num_pairs` pairs over `num_experts` experts can fill."""
    return (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """topk_ids: (num_tokens, top_k) expert ids (any integer dtype) -> the blocks described in the module docstring."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be (num_tokens, top_k), got shape {tuple(topk_ids.shape)}")
    if block_m < 1:
        raise ValueError(f"block_m must be positive, got {block_m}")
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    num_blocks = max_blocks(num_pairs, num_experts, block_m)

    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)                          # inclusive: the blocks up to each expert's last
    block_start = block_end - blocks
    num_valid_blocks = block_end[-1:].to(torch.int32)

    block = torch.arange(num_blocks, device=device)
    # block b belongs to the first expert whose blocks end after b
    owner = torch.searchsorted(block_end, block, right=True)
    expert_ids = torch.where(block < block_end[-1], owner, -1).to(torch.int32)

    order = torch.argsort(flat, stable=True)                     # pair ids, grouped by expert, in pair order
    expert_of = flat[order]
    rank = torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[expert_of]
    destination = block_start[expert_of] * block_m + rank
    sorted_pair_ids = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, destination, order.to(torch.int32))
    return MoEAlignment(sorted_pair_ids, expert_ids, num_valid_blocks, block_m, num_pairs)


def choose_block_m(num_pairs: int, num_experts: int) -> int:
    """BLOCK_M for a batch: about the pairs an expert gets on average (16, the smallest tensor-core tile, for decode;
    up to 64 for prefill, where larger blocks read each expert's weights fewer times)."""
    average = num_pairs / num_experts
    for block_m in (16, 32):
        if average <= block_m:
            return block_m
    return 64

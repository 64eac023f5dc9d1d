"""Causal grouped-query attention over the paged KV cache that never builds a (query x context) matrix.

Flash-style in plain PyTorch (runs on a CPU and a GPU alike): tiles of `query_tile` queries against tiles of
`key_tile` keys read straight from the cache blocks of each sequence's block table, with an online softmax (a
running max and sum per query row, the accumulator rescaled as the max grows). Memory is one tile of scores,
(b, num_heads, query_tile, key_tile) float32, plus one tile of keys and values gathered from the cache, whatever
the context length. GQA without repeating K / V: the query heads that share a KV head are the rows of one
product against that head's keys.

`paged_attention_reference` is the path it replaces and is tested against: every sequence's keys gathered whole
and one SDPA call with a (query x context) mask (the engine runs it with `enforce_eager=True`).

Shapes (b sequences, each with q new tokens whose keys and values are already written to the cache):
  q             (b, q, H, D)                query j of sequence s sits at position context_lens[s] + j
  k/v_cache     (num_blocks, block_size, KVH, D)
  block_tables  (b, max_blocks) int64       block ids; entries past a sequence's last block may hold anything valid
  context_lens  (b,) int64                  keys 0 .. context_lens[s] + j are visible to query j
-> (b, q, H, D) in q's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KEY_TILE = 1024        # keys per online-softmax update (a multiple of the block size is read per tile)
QUERY_TILE = 256       # queries per pass over the keys


def read_kv(keys: torch.Tensor, values: torch.Tensor, scales: tuple[float, float] | None, dtype: torch.dtype):
    """Keys and values read from the cache, in the compute dtype; an fp8 cache's scaled back by its scales."""
    if scales is not None:
        return keys.to(dtype) * scales[0], values.to(dtype) * scales[1]
    return keys.to(dtype), values.to(dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, scale: float, kv_scales: tuple[float, float] | None = None,
                    max_kv_len: int | None = None, min_context_len: int | None = None,
                    key_tile: int = KEY_TILE, query_tile: int = QUERY_TILE) -> torch.Tensor:
    """Online-softmax attention of `q` over the sequences' cached keys (shapes in the module docstring).

    max_kv_len: the longest sequence's keys (context + q), when the caller knows it on the host: tiles past it are
    skipped. None (the graph-safe step: no host synchronisation) walks every block of `block_tables`.
    min_context_len: the shortest context, when known on the host: key tiles that every query of a query tile
    sees whole skip the mask."""
    b, q_len, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    blocks_per_tile = max(1, key_tile // block_size)
    tile = blocks_per_tile * block_size
    width = block_tables.shape[1]
    if max_kv_len is not None:
        width = min(width, (max_kv_len + block_size - 1) // block_size)
    out = torch.empty_like(q)
    # the products in float32 on a CPU: bfloat16 / float16 batched products there are ~20x slower (most CPUs
    # have no bfloat16 arithmetic), and a tile converts in a fraction of the product's time; on a GPU in q's dtype
    compute = torch.float32 if q.device.type == "cpu" else q.dtype
    # rows of one product: the `group` query heads of a KV head times the query tile's positions
    qs = (q.to(compute) * scale).view(b, q_len, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    for q0 in range(0, q_len, query_tile):
        qt = min(query_tile, q_len - q0)
        rows = qs[:, :, :, q0:q0 + qt].reshape(b, num_kv_heads, group * qt, head_dim)
        query_pos = context_lens[:, None] + torch.arange(q0, q0 + qt, device=q.device)        # (b, qt)
        run_max = torch.full((b, num_kv_heads, group * qt, 1), float("-inf"), dtype=torch.float32, device=q.device)
        run_sum = torch.zeros_like(run_max)
        acc = torch.zeros(b, num_kv_heads, group * qt, head_dim, dtype=torch.float32, device=q.device)
        # keys past the last query of this tile are seen by none of its queries
        last = width if max_kv_len is None else min(width, (max_kv_len - q_len + q0 + qt + block_size - 1)
                                                    // block_size)
        for b0 in range(0, last, blocks_per_tile):
            b1 = min(b0 + blocks_per_tile, last)
            idx = block_tables[:, b0:b1]
            n = (b1 - b0) * block_size
            keys, values = read_kv(k_cache[idx].view(b, n, num_kv_heads, head_dim),
                                   v_cache[idx].view(b, n, num_kv_heads, head_dim), kv_scales, compute)
            scores = torch.matmul(rows, keys.permute(0, 2, 3, 1)).float()                   # (b, KVH, G*qt, n)
            whole = min_context_len is not None and b0 * block_size + n <= min_context_len + q0 + 1
            if not whole:
                key_pos = torch.arange(b0 * block_size, b0 * block_size + n, device=q.device)
                hidden = key_pos[None, None, :] > query_pos[:, :, None]                     # (b, qt, n)
                scores.view(b, num_kv_heads, group, qt, n).masked_fill_(hidden[:, None, None], float("-inf"))
            new_max = torch.maximum(run_max, scores.amax(-1, keepdim=True))
            # a row with no visible key yet keeps max -inf: shift by 0 there so exp gives 0, not nan
            shift = torch.where(new_max == float("-inf"), 0.0, new_max)
            probs = torch.exp_(scores.sub_(shift))
            rescale = torch.exp(run_max - shift)
            run_sum.mul_(rescale).add_(probs.sum(-1, keepdim=True))
            acc.mul_(rescale).add_(torch.matmul(probs.to(values.dtype), values.transpose(1, 2)).float())
            run_max = new_max
            del scores, probs            # this tile's scores go before the next tile's are made
        res = (acc / run_sum).view(b, num_kv_heads, group, qt, head_dim).permute(0, 3, 1, 2, 4)
        out[:, q0:q0 + qt] = res.reshape(b, qt, num_heads, head_dim).to(q.dtype)
    return out


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                              kv_scales: tuple[float, float] | None = None) -> torch.Tensor:
    """The same result the plain way: each sequence's blocks gathered whole and one SDPA with a boolean
    (query x context) mask, GQA by SDPA's enable_gqa. Memory grows with q x context."""
    b, q_len, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    length = block_tables.shape[1] * block_size
    keys, values = read_kv(k_cache[block_tables].view(b, length, num_kv_heads, head_dim),
                           v_cache[block_tables].view(b, length, num_kv_heads, head_dim), kv_scales, q.dtype)
    query_pos = context_lens[:, None] + torch.arange(q_len, device=q.device)
    visible = torch.arange(length, device=q.device)[None, None, :] <= query_pos[:, :, None]    # (b, q, length)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=visible[:, None], scale=scale,
                                         enable_gqa=num_heads != num_kv_heads)
    return out.transpose(1, 2)

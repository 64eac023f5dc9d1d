"""Causal grouped-query attention without positional encoding, over an optional paged KV cache."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemoh.config import NemotronHConfig
from nemoh.kernels.paged_attention import KEY_TILE, paged_attention, paged_attention_reference, read_kv
from nemoh.models.forward_context import ForwardContext, StepContext, consecutive_span
from nemoh.models.fused import SharedWeight
from nemoh.models.linear import Linear, PackedWeight, _native_panels

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class Attention(nn.Module):
    def __init__(self, config: NemotronHConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self._qkv_weight, self._qkv_bias = SharedWeight(stack=False), SharedWeight(stack=False)
        self._qkv_packed = PackedWeight()

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (num_tokens, hidden) -> (num_tokens, hidden)."""
        n = x.shape[0]
        q, k, v = self._project_qkv(x)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        cache = ctx.kv_caches.get(self.layer_idx)
        if cache is None:
            out = self._attend_uncached(q, k, v, ctx)
        else:
            out = self._attend_cached(q, k, v, ctx, cache)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))

    def _project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Inference with dense projections: one matmul for q, k and v together (fewer, larger products)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if torch.is_grad_enabled() or any(type(p) is not Linear for p in projs) or _native_panels(x, x.new_empty(0)):
            return tuple(p(x) for p in projs)
        weight = self._qkv_weight.get([p.weight for p in projs])
        bias = self._qkv_bias.get([p.bias for p in projs]) if self.q_proj.bias is not None else None
        return self._qkv_packed.linear(x, weight, bias).split([p.out_features for p in projs], dim=-1)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int) -> torch.Tensor:
        """q: (B, q_len, H, D), k/v: (B, kv_len, KVH, D) with kv_len = context_len + q_len."""
        q_len, kv_len = q.shape[1], k.shape[1]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if q_len == 1:
            mask, causal = None, False
        elif context_len == 0:
            mask, causal = None, True
        else:
            # query i sits at absolute position context_len + i and sees keys 0..context_len + i
            rows = torch.arange(q_len, device=q.device)[:, None] + context_len
            mask, causal = torch.arange(kv_len, device=q.device)[None, :] <= rows, False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.transpose(1, 2)

    def _attend_uncached(self, q, k, v, ctx: ForwardContext) -> torch.Tensor:
        lens = ctx.query_lens
        if len(set(lens)) == 1:
            b, t = len(lens), lens[0]
            return self._sdpa(q.view(b, t, *q.shape[1:]), k.view(b, t, *k.shape[1:]),
                              v.view(b, t, *v.shape[1:]), 0).reshape(q.shape)
        out = torch.empty_like(q)
        for i, (s, e) in enumerate(zip(ctx.query_start_loc[:-1], ctx.query_start_loc[1:])):
            out[s:e] = self._sdpa(q[None, s:e], k[None, s:e], v[None, s:e], 0)[0]
        return out

    def _attend_cached(self, q, k, v, ctx: ForwardContext, cache) -> torch.Tensor:
        k_cache, v_cache = cache
        k_scale, v_scale = ctx.kv_scales.get(self.layer_idx, (1.0, 1.0))
        quantized = k_cache.dtype in FP8_DTYPES
        scales = (k_scale, v_scale) if quantized else None
        flat_k = k_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_v = v_cache.view(-1, self.num_kv_heads, self.head_dim)
        if quantized:
            flat_k[ctx.slot_mapping] = (k.float() / k_scale).to(k_cache.dtype)
            flat_v[ctx.slot_mapping] = (v.float() / v_scale).to(v_cache.dtype)
        else:
            flat_k[ctx.slot_mapping] = k.to(k_cache.dtype)
            flat_v[ctx.slot_mapping] = v.to(v_cache.dtype)
        out = torch.empty_like(q)
        batched = ctx.single_token_seqs
        if batched:
            self._attend_decode_batch(q, ctx, k_cache, v_cache, scales, out)
        done = set()
        for group in ctx.prefill_groups:
            # fresh prompts of one length see only their own new keys: one causal SDPA for the group, on
            # the keys as they were written (rounded through the cache dtype, as a cache read returns them)
            rows, _ = ctx.group_index(group)
            b, t = len(group), ctx.query_lens[group[0]]
            keys, values = read_kv(flat_k[ctx.slot_mapping[rows]], flat_v[ctx.slot_mapping[rows]], scales,
                                   q.dtype)
            out[rows] = self._sdpa(q[rows].view(b, t, *q.shape[1:]), keys.view(b, t, *keys.shape[1:]),
                                   values.view(b, t, *values.shape[1:]), 0).reshape(b * t, *q.shape[1:])
            done.update(group)
        for i, (s, e) in enumerate(zip(ctx.query_start_loc[:-1], ctx.query_start_loc[1:])):
            if e - s == 1 or i in done:
                continue
            context_len = ctx.context_lens[i]
            if context_len and not ctx.reference_attention:
                # a chunk after the first: tiles of keys straight from the cache, no (chunk x context) mask
                table = torch.tensor(ctx.block_tables[i], dtype=torch.long, device=q.device)[None]
                out[s:e] = paged_attention(q[None, s:e], k_cache, v_cache, table,
                                           torch.tensor([context_len], device=q.device), self.scale, scales,
                                           max_kv_len=context_len + (e - s), min_context_len=context_len)[0]
                continue
            keys, values = self._sequence_kv(ctx, i, context_len + (e - s), k_cache, v_cache, scales, q.dtype)
            out[s:e] = self._sdpa(q[None, s:e], keys[None], values[None], context_len)[0]
        return out

    def _attend_decode_batch(self, q, ctx: ForwardContext, k_cache, v_cache, scales, out) -> None:
        """All single-token sequences in one attention over their block tables, padded to the longest. Past
        one key tile of context, the tiled online softmax (`paged_attention`): memory of one tile per sequence
        instead of every sequence's whole padded context."""
        rows, tables, mask = ctx.decode_attention_index
        if tables.shape[1] * ctx.block_size > KEY_TILE and not ctx.reference_attention:
            context_lens, max_kv_len = ctx.decode_context_lens
            out[rows] = paged_attention(q[rows][:, None], k_cache, v_cache, tables, context_lens, self.scale,
                                        scales, max_kv_len=max_kv_len)[:, 0]
            return
        if len(ctx.single_token_seqs) == 1 and q.dtype != torch.float32 and q.device.type == "cpu":
            self._attend_lone_stream(q, ctx, k_cache, v_cache, scales, out)
            return
        b = rows.shape[0]
        blocks = ctx.decode_block_span or tables          # a view of the cache where the blocks allow it
        keys, values = read_kv(k_cache[blocks].view(b, -1, self.num_kv_heads, self.head_dim),
                               v_cache[blocks].view(b, -1, self.num_kv_heads, self.head_dim), scales, q.dtype)
        if b > 1 and q.dtype != torch.float32:
            out[rows] = self._one_query_attention(q[rows], keys, values, mask)
            return
        res = F.scaled_dot_product_attention(
            q[rows][:, :, None], keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)
        out[rows] = res[:, :, 0]

    def _attend_lone_stream(self, q, ctx: ForwardContext, k_cache, v_cache, scales, out) -> None:
        """The one single-token sequence of a bfloat16 / float16 step on a CPU (a one-stream decode step, an
        MTP draft): its keys as one view of the cache where its blocks are consecutive, no padded index or
        mask (the demo's bfloat16 decode 4-6% faster without them, in runs alternating with the padded way)."""
        i = ctx.single_token_seqs[0]
        kv_len = ctx.context_lens[i] + 1
        keys, values = self._sequence_kv(ctx, i, kv_len, k_cache, v_cache, scales, q.dtype)
        row = ctx.query_start_loc[i]
        out[row:row + 1] = self._lone_query_attention(q[row:row + 1], keys, values, kv_len)

    def _sequence_kv(self, ctx: ForwardContext, i: int, kv_len: int, k_cache, v_cache, scales, dtype):
        """Sequence i's first kv_len keys and values, (kv_len, KVH, D) each: one view of the cache where its
        blocks are consecutive (a gather where not), then `read_kv`."""
        blocks = ctx.block_tables[i][: (kv_len + ctx.block_size - 1) // ctx.block_size]
        idx = consecutive_span(blocks) or torch.tensor(blocks, dtype=torch.long, device=k_cache.device)
        return read_kv(k_cache[idx].view(-1, self.num_kv_heads, self.head_dim)[:kv_len],
                       v_cache[idx].view(-1, self.num_kv_heads, self.head_dim)[:kv_len], scales, dtype)

    def _lone_query_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                              kv_len: int) -> torch.Tensor:
        """One sequence's one query in bfloat16 / float16 on a CPU: q (1, H, D), keys / values (>= kv_len,
        KVH, D) -> (1, H, D). CPU SDPA in these dtypes is 2-3x slower for one query row than for two (1200
        keys: 303-426 against 97-164 us over three runs of `python benchmarks/decode_attention.py`), so the
        row is attended twice and one copy kept; the result is the same bit for bit. The keys are cut to
        kv_len, so no mask is needed."""
        two = q[:, :, None].expand(1, self.num_heads, 2, self.head_dim).contiguous()
        res = F.scaled_dot_product_attention(
            two, keys[:kv_len].transpose(0, 1)[None], values[:kv_len].transpose(0, 1)[None], scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)
        return res[:, :, 0]

    def _one_query_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
        """q (b, H, D), keys / values (b, kv_len, KVH, D), mask (b, 1, 1, kv_len) -> (b, H, D).

        Two batched products with each KV head's query heads as the rows, softmax in float32. Used for a
        batch of sequences in bfloat16 / float16, where CPU SDPA with a key mask is much slower: 32 x 256
        keys of the engine benchmark's shape 5.9 ms against 1.1 ms (`python benchmarks/decode_attention.py`,
        2 threads); in float32 SDPA is as fast or faster and stays; one sequence takes `_attend_lone_stream`."""
        b, kv_len = keys.shape[0], keys.shape[1]
        group = self.num_heads // self.num_kv_heads        # query head h reads KV head h // group
        q = q.view(b, self.num_kv_heads, group, self.head_dim)
        scores = torch.matmul(q, keys.permute(0, 2, 3, 1)).float() * self.scale       # (b, KVH, group, kv_len)
        scores.masked_fill_(~mask.view(b, 1, 1, kv_len), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        return torch.matmul(probs, values.transpose(1, 2)).view(b, self.num_heads, self.head_dim)


    # ---- the graph-safe uniform step ---------------------------------------------------------------------
    def forward_step(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """x: (num_seqs * q, hidden) -> (num_seqs * q, hidden) with no host synchronisation: the rows' keys and
        values written at ctx.slot_mapping, then row r attending the keys at positions <= positions[r] over every
        block of its sequence's table (max_blocks of them, so the shapes are fixed), one key tile at a time."""
        n, S, q = x.shape[0], ctx.num_seqs, ctx.q
        qs, k, v = self._project_qkv(x)
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        k_scale, v_scale = ctx.kv_scales.get(self.layer_idx, (1.0, 1.0))
        quantized = k_cache.dtype in FP8_DTYPES
        flat_k = k_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_v = v_cache.view(-1, self.num_kv_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if quantized:
            # as bytes: index_copy_ has no float8 kernel on every device
            k = (k.float() / k_scale).to(k_cache.dtype).view(torch.uint8)
            v = (v.float() / v_scale).to(v_cache.dtype).view(torch.uint8)
            flat_k, flat_v = flat_k.view(torch.uint8), flat_v.view(torch.uint8)
        flat_k.index_copy_(0, ctx.slot_mapping, k.to(flat_k.dtype))
        flat_v.index_copy_(0, ctx.slot_mapping, v.to(flat_v.dtype))
        scales = (k_scale, v_scale) if quantized else None
        qs = qs.view(S, q, self.num_heads, self.head_dim)
        if ctx.reference_attention:
            out = paged_attention_reference(qs, k_cache, v_cache, ctx.block_tables, ctx.positions.view(S, q)[:, 0],
                                            self.scale, scales)
        else:   # every block of the table, tile by tile (static shapes): memory of one tile, not the context
            out = paged_attention(qs, k_cache, v_cache, ctx.block_tables, ctx.positions.view(S, q)[:, 0],
                                  self.scale, scales)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


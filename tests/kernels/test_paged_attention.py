"""The tiled online-softmax attention over the paged cache against the plain reference (gather + masked SDPA),
and its memory: one tile, whatever the context length."""
from __future__ import annotations

import pytest
import torch

from nemoh.engine.memory_profile import TensorMemoryTracker
from nemoh.kernels.paged_attention import paged_attention, paged_attention_reference


def _cache(num_blocks, block_size, kvh, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, block_size, kvh, d, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, kvh, d, generator=g).to(dtype)
    return k, v


def _tables(context_lens, q_len, block_size, num_blocks, seed=1):
    """Shuffled block ids per sequence, padded to the longest with valid ids (as the engine pads)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    need = [(c + q_len + block_size - 1) // block_size for c in context_lens]
    width, tables, at = max(need), [], 0
    for n in need:
        ids = perm[at:at + n]
        at += n
        tables.append(ids + [perm[-1]] * (width - n))
    return torch.tensor(tables, dtype=torch.long)


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("q_len,context_lens,heads", [
    (1, [0, 5, 77, 300], (4, 2)),       # decode batch, GQA
    (4, [3, 64, 129], (4, 1)),          # MTP verification (1 + k rows)
    (37, [0], (6, 3)),                  # a first chunk
    (50, [211], (8, 2)),                # a later chunk, query tiles and key tiles both split
])
def test_matches_reference_float32(q_len, context_lens, heads):
    h, kvh, d, bs = heads[0], heads[1], 16, 8
    k_cache, v_cache = _cache(128, bs, kvh, d)
    tables = _tables(context_lens, q_len, bs, 128)
    ctx = torch.tensor(context_lens)
    q = torch.randn(len(context_lens), q_len, h, d, generator=torch.Generator().manual_seed(2))
    ref = paged_attention_reference(q, k_cache, v_cache, tables, ctx, d ** -0.5)
    kv = max(context_lens) + q_len
    for kwargs in ({}, {"key_tile": 32, "query_tile": 16}, {"key_tile": 8, "query_tile": 7, "max_kv_len": kv,
                                                              "min_context_len": min(context_lens)}):
        out = paged_attention(q, k_cache, v_cache, tables, ctx, d ** -0.5, **kwargs)
        assert out.shape == q.shape
        assert _rel(out, ref) <= 1e-5, kwargs


def test_tiles_that_a_query_does_not_reach_are_masked():
    """A key just past a query's position must not leak in: break the cache there and the output stays."""
    bs, d = 4, 8
    k_cache, v_cache = _cache(16, bs, 1, d)
    tables = torch.arange(16)[None]
    ctx = torch.tensor([9])
    q = torch.randn(1, 3, 2, d)
    out = paged_attention(q, k_cache, v_cache, tables, ctx, 0.3, key_tile=4, query_tile=2)
    k_cache.view(-1, 1, d)[12:] = 1e4                      # positions 12.. are after the last query (11)
    v_cache.view(-1, 1, d)[12:] = 1e4
    again = paged_attention(q, k_cache, v_cache, tables, ctx, 0.3, key_tile=4, query_tile=2)
    assert torch.equal(out, again)
    v_cache.view(-1, 1, d)[11] = 1e4                        # the last query sees position 11
    assert not torch.equal(out[0, 2], paged_attention(q, k_cache, v_cache, tables, ctx, 0.3, key_tile=4)[0, 2])


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_matches_reference_half(dtype, tol):
    k_cache, v_cache = _cache(64, 16, 2, 64, dtype)
    ctx = torch.tensor([40, 500])
    tables = _tables([40, 500], 3, 16, 64)
    q = torch.randn(2, 3, 8, 64).to(dtype)
    ref = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables, ctx, 0.125)
    out = paged_attention(q, k_cache, v_cache, tables, ctx, 0.125, key_tile=128)
    assert out.dtype == dtype and _rel(out, ref) <= tol


def test_fp8_cache_with_scales():
    k32, v32 = _cache(32, 16, 2, 32)
    k_cache, v_cache = (k32 / 2).to(torch.float8_e4m3fn), (v32 / 3).to(torch.float8_e4m3fn)
    ctx, tables = torch.tensor([100]), _tables([100], 5, 16, 32)
    q = torch.randn(1, 5, 4, 32)
    ref = paged_attention_reference(q, k_cache, v_cache, tables, ctx, 0.2, (2.0, 3.0))
    out = paged_attention(q, k_cache, v_cache, tables, ctx, 0.2, (2.0, 3.0), key_tile=32)
    assert _rel(out, ref) <= 1e-5
    plain = paged_attention_reference(q, k32, v32, tables, ctx, 0.2)
    assert 1e-5 < _rel(out, plain) < 0.1           # fp8 rounding is there, and small


def _chunk_peak(attend, context_len, chunk=256, h=8, kvh=2, d=32, bs=16):
    """Peak bytes one prefill chunk of `chunk` queries allocates over a cache holding `context_len` keys."""
    num_blocks = (context_len + chunk) // bs + 1
    k_cache = torch.randn(num_blocks, bs, kvh, d)
    v_cache = torch.randn(num_blocks, bs, kvh, d)
    tables = torch.arange(num_blocks - 1)[None]
    q = torch.randn(1, chunk, h, d)
    ctx = torch.tensor([context_len])
    with TensorMemoryTracker() as tracker:
        attend(q, k_cache, v_cache, tables, ctx, d ** -0.5)
    return tracker.peak_bytes


def test_prefill_memory_does_not_grow_with_context():
    """Fixed chunk, 4k vs 64k context: the tiled path's peak within 10%; the reference's grows with the
    context (so the measurement can tell the two apart)."""
    def tiled(*a):
        return paged_attention(*a, max_kv_len=a[4].item() + a[0].shape[1], min_context_len=a[4].item())

    short, long = _chunk_peak(tiled, 4096), _chunk_peak(tiled, 65536)
    assert long <= 1.1 * short, (short, long)
    ref_short = _chunk_peak(paged_attention_reference, 4096)
    ref_long = _chunk_peak(paged_attention_reference, 16384)
    assert ref_long > 3 * ref_short


def _attention_layer(block_size=16):
    from nemoh.config import NemotronHConfig
    from nemoh.models.attention import Attention

    cfg = NemotronHConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          layer_types=["attention"], vocab_size=128)
    torch.manual_seed(0)
    layer = Attention(cfg, 0)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return layer


def _run_layer(layer, reference, chunks, block_size=16, num_blocks=800):
    """Feed `chunks` (a list of {seq: num_new_tokens} steps) through the layer with the eager context;
    returns the last step's output."""
    from nemoh.models.forward_context import ForwardContext

    gen = torch.Generator().manual_seed(3)
    kv = {0: (torch.zeros(num_blocks, block_size, 2, 16), torch.zeros(num_blocks, block_size, 2, 16))}
    per_seq = num_blocks // 4
    lens: dict[int, int] = {}
    # every other block of the sequence's range, in reverse: a scattered table
    tables = {s: [s * per_seq + per_seq - 1 - 2 * b for b in range(per_seq // 2)] for s in range(4)}
    for step in chunks:
        seqs = list(step)
        qsl, slots = [0], []
        for s in seqs:
            n, start = step[s], lens.get(s, 0)
            qsl.append(qsl[-1] + n)
            table = tables[s]
            slots += [table[p // block_size] * block_size + p % block_size for p in range(start, start + n)]
        ctx = ForwardContext(query_start_loc=qsl, context_lens=[lens.get(s, 0) for s in seqs],
                             block_tables=[tables[s] for s in seqs],
                             slot_mapping=torch.tensor(slots), block_size=block_size, kv_caches=kv,
                             reference_attention=reference)
        x = torch.randn(qsl[-1], 64, generator=gen)
        with torch.inference_mode():
            out = layer(x, ctx)
        for s in seqs:
            lens[s] = lens.get(s, 0) + step[s]
    return out


def test_attention_layer_paged_equals_reference():
    """The eager layer: chunked prefill past the first chunk, then a decode batch past one key tile
    (KEY_TILE = 1024), the tiled path against the reference path (≤ 1e-5 relative, float32)."""
    layer = _attention_layer()
    steps = [{0: 700, 1: 300}, {0: 600, 1: 500}, {0: 1, 1: 1, 2: 9}, {0: 1, 1: 1, 2: 1}]
    for upto in (2, 3, 4):
        tiled = _run_layer(layer, False, steps[:upto])
        ref = _run_layer(layer, True, steps[:upto])
        assert _rel(tiled, ref) <= 1e-5, upto

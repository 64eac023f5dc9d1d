"""The cached entry points agree with the full forward: prefill + decode, chunked prefill, mixed batches,
and the multi-token step with per-position states (what speculative decoding rolls back to)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import nemoh
import nemoh.models.linear as linear_module
from nemoh.models.forward_context import ForwardContext

BLOCK = 4


class Caches:
    """A minimal stand-in for the engine's caches: contiguous blocks per sequence, one state slot each."""

    def __init__(self, model, num_seqs: int, max_len: int):
        cfg = model.config
        self.blocks_per_seq = (max_len + BLOCK - 1) // BLOCK
        nblocks = num_seqs * self.blocks_per_seq
        self.kv = {i: (torch.zeros(nblocks, BLOCK, cfg.num_key_value_heads, cfg.head_dim),
                       torch.zeros(nblocks, BLOCK, cfg.num_key_value_heads, cfg.head_dim))
                   for i in cfg.attention_layer_ids + cfg.mtp_attention_layer_ids}
        self.mamba = {i: (torch.zeros(num_seqs, cfg.mamba_conv_dim, cfg.conv_kernel - 1),
                          torch.zeros(num_seqs, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size))
                      for i in cfg.mamba_layer_ids}
        self.lens = [0] * num_seqs

    def table(self, seq: int) -> list[int]:
        return list(range(seq * self.blocks_per_seq, (seq + 1) * self.blocks_per_seq))

    def context(self, seqs: list[int], counts: list[int], save: bool = False) -> ForwardContext:
        qsl, slots = [0], []
        for s, n in zip(seqs, counts):
            qsl.append(qsl[-1] + n)
            table = self.table(s)
            slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(self.lens[s], self.lens[s] + n)]
        return ForwardContext(query_start_loc=qsl, context_lens=[self.lens[s] for s in seqs], state_slots=seqs,
                              block_tables=[self.table(s) for s in seqs],
                              slot_mapping=torch.tensor(slots, dtype=torch.long), block_size=BLOCK,
                              kv_caches=self.kv, mamba_caches=self.mamba, save_intermediate_states=save)

    def run(self, model, tokens_per_seq: dict[int, list[int]], save: bool = False):
        seqs = list(tokens_per_seq)
        ctx = self.context(seqs, [len(tokens_per_seq[s]) for s in seqs], save)
        ids = torch.tensor([t for s in seqs for t in tokens_per_seq[s]])
        with torch.no_grad():
            hidden = model.forward_hidden(ids, ctx)
        for s in seqs:
            self.lens[s] += len(tokens_per_seq[s])
        out, start = {}, 0
        for s in seqs:
            n = len(tokens_per_seq[s])
            out[s] = model.compute_logits(hidden[start:start + n])
            start += n
        return out, ctx


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return nemoh.load_model(tiny_checkpoint, dtype="float32")


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def tokens(n, seed):
    return torch.randint(3, 4096, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("prompt_len,steps", [(1, 6), (13, 8), (16, 3)])
def test_prefill_then_decode_matches_full_forward(model, prompt_len, steps):
    seq = tokens(prompt_len + steps, prompt_len)
    full = model(torch.tensor([seq]))[0]
    caches = Caches(model, 1, 64)
    out, _ = caches.run(model, {0: seq[:prompt_len]})
    assert rel(out[0], full[:prompt_len]) <= 1e-4
    for i in range(prompt_len, prompt_len + steps):
        out, _ = caches.run(model, {0: [seq[i]]})
        assert rel(out[0][0], full[i]) <= 1e-4, f"decode step at position {i}"


def test_chunked_prefill_and_mixed_batch_match_full_forward(model):
    a, b, c = tokens(23, 1), tokens(17, 2), tokens(9, 3)
    fulls = {i: model(torch.tensor([s]))[0] for i, s in enumerate((a, b, c))}
    caches = Caches(model, 3, 64)
    got = {0: [], 1: [], 2: []}
    # step 1: chunks of two prompts; step 2: the rest of a, all of c, first decode-like token of b
    plan = [{0: a[:10], 1: b[:16]}, {0: a[10:22], 1: b[16:17], 2: c[:5]}, {0: a[22:], 2: c[5:]}]
    for step in plan:
        out, _ = caches.run(model, step)
        for s, logits in out.items():
            got[s].append(logits)
    for s in range(3):
        assert rel(torch.cat(got[s]), fulls[s]) <= 1e-4, f"sequence {s}"


def test_multi_token_step_matches_single_steps_and_records_states(model):
    seq = tokens(20, 7)
    one = Caches(model, 1, 64)
    one.run(model, {0: seq[:15]})
    single = [one.run(model, {0: [t]})[0][0][0] for t in seq[15:]]
    single_states = {i: (c[0].clone(), s[0].clone()) for i, (c, s) in one.mamba.items()}

    multi = Caches(model, 1, 64)
    multi.run(model, {0: seq[:15]})
    out, ctx = multi.run(model, {0: seq[15:]}, save=True)
    assert rel(out[0], torch.stack(single)) <= 1e-4
    for layer, (conv, ssm) in multi.mamba.items():
        conv_states, ssm_states = ctx.intermediate_states[layer][0]
        assert conv_states.shape[0] == ssm_states.shape[0] == 5
        # the last recorded state is what was written to the slot, and equals the step-by-step state
        assert torch.equal(conv_states[-1], conv[0]) and torch.equal(ssm_states[-1], ssm[0])
        assert rel(ssm_states[-1], single_states[layer][1]) <= 1e-4
        assert rel(conv_states[-1], single_states[layer][0]) <= 1e-4

    # rolling back to position 2 of the 5 and decoding from there equals decoding from a fresh prefill
    rolled = Caches(model, 1, 64)
    rolled.run(model, {0: seq[:15]})
    _, ctx = rolled.run(model, {0: seq[15:]}, save=True)
    for layer, (conv, ssm) in rolled.mamba.items():
        conv_states, ssm_states = ctx.intermediate_states[layer][0]
        conv[0], ssm[0] = conv_states[2], ssm_states[2]
    rolled.lens[0] = 18
    after_rollback = rolled.run(model, {0: [seq[18]]})[0][0][0]
    assert rel(after_rollback, single[3]) <= 1e-4


@pytest.mark.parametrize("length", [2, 11])
def test_equal_length_prompts_batched_match_one_at_a_time(model, length):
    """Fresh prompts of one length take the batched prefill (one scan, one attention for the group); the
    logits, the Mamba states and the KV written must equal those of each prompt run alone, and a decode
    step afterwards must agree too. A prompt of another length in the same step keeps its own path."""
    prompts = {0: tokens(length, 20), 1: tokens(length, 21), 2: tokens(7, 22), 3: tokens(length, 23)}
    together = Caches(model, 4, 64)
    out, ctx = together.run(model, prompts)
    assert ctx.prefill_groups == [[0, 1, 3]]
    alone = Caches(model, 4, 64)
    for s, p in prompts.items():
        single, single_ctx = alone.run(model, {s: p})
        assert single_ctx.prefill_groups == []
        assert rel(out[s], single[s]) <= 1e-5, f"prompt {s}"
    for layer in together.mamba:
        for a, b in zip(together.mamba[layer], alone.mamba[layer]):
            assert rel(a, b) <= 1e-5, f"Mamba layer {layer}"
    for layer in together.kv:
        for a, b in zip(together.kv[layer], alone.kv[layer]):
            # (the MTP layer's cache stays empty here: compare absolutely against the largest entry)
            assert (a - b).abs().max() <= 1e-5 * b.abs().max(), f"KV layer {layer}"
    step = {s: [5 + s] for s in prompts}
    after_together, _ = together.run(model, step)
    after_alone, _ = alone.run(model, step)
    for s in prompts:
        assert rel(after_together[s], after_alone[s]) <= 1e-5


class ScatteredCaches(Caches):
    """Each sequence's blocks in reverse order: never consecutive, so attention gathers them by index."""

    def table(self, seq: int) -> list[int]:
        return super().table(seq)[::-1]


@pytest.mark.parametrize("caches_type", [Caches, ScatteredCaches])
def test_consecutive_and_scattered_block_tables_agree(model, caches_type):
    """One stream on consecutive blocks reads its keys as a view of the cache; scattered blocks are gathered.
    Both must give the full forward's logits, for a chunked prompt, a multi-token step and decode steps."""
    seq = tokens(30, 9)
    full = model(torch.tensor([seq]))[0]
    caches = caches_type(model, 1, 64)
    got = [caches.run(model, {0: seq[:9]})[0][0], caches.run(model, {0: seq[9:20]})[0][0]]
    got += [caches.run(model, {0: [t]})[0][0] for t in seq[20:]]
    assert rel(torch.cat(got), full) <= 1e-4


def test_forward_for_some_rows_keeps_every_cache_complete(model):
    """forward_hidden(rows=...) returns only those rows (the layers after the last cache-keeping one skip
    the others), yet the caches are written for every position: a chunk asking for no row at all, then a
    chunk asking for its last row only, then decode steps, agree with the full forward."""
    seq = tokens(30, 7)
    full = model(torch.tensor([seq]))[0]
    caches = Caches(model, 1, 64)
    with torch.no_grad():
        for start, end, rows in ((0, 11, []), (11, 24, [12]), (24, 25, None), (25, 26, None)):
            ctx = caches.context([0], [end - start])
            hidden = model.forward_hidden(torch.tensor(seq[start:end]), ctx, rows)
            caches.lens[0] = end
            if rows == []:
                assert hidden.shape[0] == 0
                continue
            want = full[end - 1:end] if rows else full[start:end]
            assert rel(model.compute_logits(hidden), want) <= 1e-4


@pytest.mark.parametrize("decoding,window", [([0, 1, 2, 3, 4], "view"), ([3, 0, 4], "window"), ([0, 4], "gather")])
def test_decode_states_in_place_out_of_order_or_gathered_agree(model, decoding, window):
    """A decode batch steps its sequences' Mamba states in place when their slots are close together (in
    order: a view; out of order or with other sequences' slots between them: the whole window, the others
    left exactly as they are) and gathers them otherwise. All three give the full forward's logits."""
    seqs = {s: tokens(12, 20 + s) for s in range(5)}
    fulls = {s: model(torch.tensor([seq]))[0] for s, seq in seqs.items()}
    caches = Caches(model, 5, 32)
    caches.run(model, {s: seq[:8] for s, seq in seqs.items()})
    for pos in range(8, 12):
        before = {layer: ssm.clone() for layer, (_, ssm) in caches.mamba.items()}
        out, ctx = caches.run(model, {s: [seqs[s][pos]] for s in decoding})
        kind = ctx.mamba_decode_slot_window
        assert (kind is None) == (window == "gather")
        assert (kind is not None and kind[1] is None) == (window == "view")
        for s in decoding:
            assert rel(out[s][0], fulls[s][pos]) <= 1e-4, f"sequence {s} at position {pos}"
        for layer, (_, ssm) in caches.mamba.items():
            for s in set(range(5)) - set(decoding):
                assert torch.equal(ssm[s], before[layer][s]), f"slot {s} changed without being decoded"
        for s in set(range(5)) - set(decoding):
            caches.run(model, {s: [seqs[s][pos]]})


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 2), (4, 4)])
def test_one_query_attention_matches_sdpa(dtype, tol, heads, kv_heads):
    """The decode path's own attention (two batched products, float32 softmax) against SDPA with the same
    key mask, for sequences of different lengths padded to one width."""
    from nemoh.models.attention import Attention

    # only the attention's own keys
    config = SimpleNamespace(hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
                             attention_bias=False)
    attn = Attention(config, 0)
    g = torch.Generator().manual_seed(0)
    b, width = 5, 24
    q = torch.randn(b, heads, 16, generator=g).to(dtype)
    keys, values = (torch.randn(b, width, kv_heads, 16, generator=g).to(dtype) for _ in range(2))
    lens = torch.tensor([1, 7, 16, 23, 24])
    mask = (torch.arange(width)[None, :] < lens[:, None])[:, None, None, :]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float()[:, :, None], keys.float().transpose(1, 2), values.float().transpose(1, 2), attn_mask=mask,
        scale=attn.scale, enable_gqa=heads != kv_heads)[:, :, 0]
    got = attn._one_query_attention(q, keys, values, mask)
    assert got.dtype == dtype and got.shape == (b, heads, 16)
    assert (got.float() - want).abs().max().item() < tol
    # a sequence's padding keys do not matter: change them and nothing moves
    keys[0, 1:] = 1e4
    assert torch.equal(attn._one_query_attention(q, keys, values, mask)[0], got[0])


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)])
def test_lone_query_attention_matches_sdpa_and_is_taken_for_one_bfloat16_sequence(heads, kv_heads, monkeypatch,
                                                                                  tiny_checkpoint):
    """One sequence's one query in bfloat16: the query row attended twice gives what SDPA gives for it alone
    (keys cut to the sequence's length instead of masked), and a single-sequence bfloat16 decode step on a
    CPU goes this way, with its blocks in order (one view of the cache) or not (gathered), and with an fp8
    cache as a batch of two does."""
    from nemoh.models.attention import Attention

    config = SimpleNamespace(hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
                             attention_bias=False)
    attn = Attention(config, 0)
    g = torch.Generator().manual_seed(0)
    for kv_len in (1, 13, 32):
        q = torch.randn(1, heads, 16, generator=g).to(torch.bfloat16)
        keys, values = (torch.randn(32, kv_heads, 16, generator=g).to(torch.bfloat16) for _ in range(2))
        want = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], keys[:kv_len].transpose(0, 1)[None], values[:kv_len].transpose(0, 1)[None],
            scale=attn.scale, enable_gqa=heads != kv_heads)[:, :, 0]
        got = attn._lone_query_attention(q, keys, values, kv_len)
        assert got.dtype == torch.bfloat16 and got.shape == (1, heads, 16)
        assert (got.float() - want.float()).abs().max().item() <= 1e-2
        keys[kv_len:] = 1e4                              # keys past the sequence's length are never read
        assert torch.equal(attn._lone_query_attention(q, keys, values, kv_len), got)

    model = nemoh.load_model(tiny_checkpoint, dtype="bfloat16")
    calls = []
    for layer in model.backbone.layers:
        if isinstance(layer.mixer, Attention):
            real = layer.mixer._lone_query_attention
            monkeypatch.setattr(layer.mixer, "_lone_query_attention",
                                lambda *a, real=real: calls.append(a[-1]) or real(*a))
    seq = tokens(10, 3)
    full = model(torch.tensor([seq]))[0]

    class ReversedBlocks(Caches):      # blocks out of order: the keys are gathered, not one view of the cache
        def table(self, s):
            return super().table(s)[::-1]

    for caches in (Caches(model, 1, 32), ReversedBlocks(model, 1, 32)):
        calls.clear()
        caches.run(model, {0: seq[:9]})
        out, ctx = caches.run(model, {0: [seq[9]]})
        assert (ctx.decode_block_span is None) == isinstance(caches, ReversedBlocks)
        assert calls and set(calls) == {10}
        assert rel(out[0][0].float(), full[9].float()) <= 5e-2

    # an fp8 KV cache (keys scaled back on the way in): one stream alone gives what a batch of two gives
    fp8 = Caches(model, 3, 32)
    fp8.kv = {i: (k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)) for i, (k, v) in fp8.kv.items()}
    fp8.run(model, {s: seq[:9] for s in range(3)})
    calls.clear()
    alone, _ = fp8.run(model, {0: [seq[9]]})
    assert calls
    batch, _ = fp8.run(model, {1: [seq[9]], 2: [seq[9]]})
    assert rel(alone[0][0].float(), batch[1][0].float()) <= 1e-3        # equal to the bit in practice


def test_float32_weights_under_bfloat16_autocast_run_every_cached_path(model, monkeypatch):
    """The trainer evaluates its fp32 master weights under bfloat16 autocast through these cached entry points
    (`nemoh train --eval`): a prefill group, a prompt of its own length, a mixed step and a batched decode must
    all run there, with the packed products on as for the demo's weights (they once ignored autocast, gave
    attention float32 queries next to bfloat16 SDPA results, and the batched decode failed), and stay close
    to the float32 logits."""
    monkeypatch.setattr(linear_module, "PACK_MIN_ELEMENTS", 0)
    prompts = {0: tokens(6, 30), 1: tokens(6, 31), 2: tokens(9, 32)}
    steps = [{0: [7], 1: [8], 2: [9]}, {0: [10, 11], 1: [12], 2: [13]}]
    plain, mixed = Caches(model, 3, 64), Caches(model, 3, 64)
    for tokens_per_seq in [prompts] + steps:
        want, _ = plain.run(model, tokens_per_seq)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, _ = mixed.run(model, tokens_per_seq)
        for s in tokens_per_seq:
            assert got[s].dtype == torch.float32 or got[s].dtype == torch.bfloat16
            assert rel(got[s].float(), want[s]) <= 0.1, f"sequence {s}"

"""The captured step computes what the eager forward computes.

For tiny checkpoints with every layer kind (Mamba, GQA attention, LatentMoE, MLP, MTP), in every weight format
(float32, bfloat16, NVFP4, FP8) and KV-cache dtype, sequences are prefilled by an eager engine; then one decode
step (q = 1) and one speculative verification (q = 1 + k) are run three ways from the same caches:

- the eager engine forward (`ModelRunner.execute` with enforce_eager: the reference),
- the graph-safe PyTorch step (`model.forward_step` over a `StepContext`),
- the native CPU plan (`CapturedSteps.run_main`, nemoh.kernels.cpu_plan),

and their logits, the caches they leave behind and (verification) the per-position Mamba states must agree:
to float32 rounding (1e-5 relative) in float32, to bfloat16 rounding in bfloat16. The MTP drafts of the
captured proposer must equal the eager proposer's.
"""
from __future__ import annotations

import pytest
import torch

from checkpoints import make_checkpoint
from nemoh import LLM
from nemoh.engine.captured_step import CapturedSteps
from nemoh.engine.scheduler import ScheduledSeq
from nemoh.kernels import cpu_library
from nemoh.models.forward_context import StepContext
from nemoh.quant.quantize import quantize_checkpoint
from nemoh.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(cpu_library.library() is None, reason="the native CPU kernels are not built")

K = 3
PROMPT_LENS = (19, 5, 33)        # three sequences, different lengths (one shorter than a block)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: path}: dense float32 ones (every layer kind; GQA with 2 KV heads), NVFP4 and FP8 copies."""
    root = tmp_path_factory.mktemp("steps")
    dense, _ = make_checkpoint(root / "dense")
    gqa, _ = make_checkpoint(root / "gqa", num_key_value_heads=2, hybrid_override_pattern="M*E-M*")
    nvfp4 = root / "nvfp4"
    quantize_checkpoint(dense, nvfp4, fmt="nvfp4", progress=False)
    calib = root / "calib.txt"
    calib.write_text("\n".join(" ".join(f"word{(i * 7 + j) % 50}" for j in range(12)) for i in range(4)))
    fp8 = root / "fp8"
    quantize_checkpoint(dense, fp8, fmt="fp8", calib_file=calib, progress=False)
    return {"dense": dense, "gqa": gqa, "nvfp4": nvfp4, "fp8": fp8}


def prefilled_engine(path, dtype: str, kv_cache_dtype: str = "auto"):
    """An eager engine whose three sequences are prefilled and have each sampled a few tokens."""
    llm = LLM(str(path), dtype=dtype, kv_cache_dtype=kv_cache_dtype, enforce_eager=True, cache_memory_gb=0.05,
              max_model_len=256, speculative_config={"method": "mtp", "num_speculative_tokens": K})
    engine = llm.engine
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    for i, n in enumerate(PROMPT_LENS):
        engine.add_request(f"r{i}", prompt_token_ids=torch.randint(3, vocab, (n,), generator=gen).tolist(),
                           params=SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    for _ in range(4):
        engine.step()
    seqs = list(engine.scheduler.running)
    assert len(seqs) == 3 and all(s.num_output_tokens > 0 for s in seqs)
    return engine, seqs


def snapshot(runner):
    return [t.clone() for pair in list(runner.kv_caches.values()) + list(runner.mamba_caches.values())
            for t in pair]


def restore(runner, saved):
    live = [t for pair in list(runner.kv_caches.values()) + list(runner.mamba_caches.values()) for t in pair]
    for t, s in zip(live, saved):
        t.copy_(s)


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> float:
    """Max difference relative to the largest magnitude (0 when equal)."""
    a, b = a.float(), b.float()
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    assert err <= tol, f"relative error {err:.3g} > {tol}"
    return err


def step_context(engine, seqs, q: int, saved_states=None) -> StepContext:
    runner = engine.runner
    bs = runner.block_size
    width = max(len(s.block_table) for s in seqs)
    positions, slots = [], []
    for s in seqs:
        for p in range(s.num_computed_tokens, s.num_computed_tokens + q):
            positions.append(p)
            slots.append(s.block_table[p // bs] * bs + p % bs)
    tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
    return StepContext(len(seqs), q, torch.tensor(positions), torch.tensor(slots),
                       torch.tensor([s.state_slot for s in seqs]), torch.tensor(tables), bs, runner.kv_caches,
                       runner.mamba_caches, runner.kv_scales, saved_states)


def three_ways(engine, seqs, q: int):
    """(reference, graph-safe, native plan) results of one step: logits (n * q, vocab), caches after, and for
    a verification the per-position Mamba states {layer: (conv (n, q, ...), ssm (n, q, ...))}."""
    runner, model = engine.runner, engine.model
    drafts = [list(range(7, 7 + q - 1)) for _ in seqs]
    for s, d in zip(seqs, drafts):
        s.draft_token_ids = d
    scheduled = [ScheduledSeq(s, q, q - 1) for s in seqs]
    before = snapshot(runner)

    results = runner.execute(scheduled)
    ref = (torch.cat([r.logits for r in results]), snapshot(runner),
           {layer: (torch.stack([r.intermediate[layer][0] for r in results]),
                    torch.stack([r.intermediate[layer][1] for r in results])) for layer in results[0].intermediate})

    restore(runner, before)
    saved = None
    if q > 1:
        saved = {layer: (torch.zeros(len(seqs), q, *c.shape[1:], dtype=c.dtype),
                         torch.zeros(len(seqs), q, *s.shape[1:], dtype=s.dtype))
                 for layer, (c, s) in runner.mamba_caches.items()}
    ctx = step_context(engine, seqs, q, saved)
    tokens = torch.tensor([t for s, d in zip(seqs, drafts) for t in [s.token_ids[-1]] + d[:q - 1]])
    with torch.inference_mode():
        safe_logits = model.compute_logits(model.forward_step(tokens, ctx))
    safe = (safe_logits, snapshot(runner), saved or {})

    restore(runner, before)
    captured = CapturedSteps(model, runner, 4, K, engine.max_model_len)
    outs = captured.run_main(scheduled, q)
    plan = (torch.cat([o.logits for o in outs]), snapshot(runner),
            {layer: (torch.stack([o.intermediate[layer][0] for o in outs]),
                     torch.stack([o.intermediate[layer][1] for o in outs])) for layer in outs[0].intermediate})
    return ref, safe, plan


# float32 models agree to float32 rounding; keys and values rounded to bfloat16 in the cache make the
# attention more sensitive to the order of the float32 sums (seen: 1.5e-5), and a bfloat16 model agrees to
# bfloat16 rounding.
CASES = [("dense", "float32", "auto", 1e-5), ("gqa", "float32", "auto", 1e-5), ("nvfp4", "float32", "auto", 1e-5),
         ("fp8", "float32", "auto", 1e-5), ("dense", "float32", "fp8", 1e-5), ("dense", "bfloat16", "auto", 3e-2),
         ("dense", "float32", "bfloat16", 3e-5)]


@pytest.mark.parametrize("name, dtype, kv, tol", CASES, ids=[f"{c[0]}-{c[1]}-kv_{c[2]}" for c in CASES])
@pytest.mark.parametrize("q", [1, 1 + K], ids=["decode", "verify"])
def test_step_three_ways(checkpoints, name, dtype, kv, tol, q):
    engine, seqs = prefilled_engine(checkpoints[name], dtype, kv)
    ref, safe, plan = three_ways(engine, seqs, q)
    for other in (safe, plan):
        close(other[0], ref[0], tol)
        if dtype == "float32":
            assert torch.equal(other[0].argmax(-1), ref[0].argmax(-1))
        for got, want in zip(other[1], ref[1]):
            if want.dtype == torch.float8_e4m3fn:
                got, want = got.float(), want.float()
            close(got, want, max(tol, 1e-5) if want.abs().max() > 0 else 0.0)
        assert set(other[2]) == set(ref[2])
        for layer, (conv, ssm) in ref[2].items():
            close(other[2][layer][0], conv, max(tol, 1e-5))
            close(other[2][layer][1], ssm, max(tol, 1e-5))


@pytest.mark.parametrize("name", ["dense", "nvfp4"])
def test_captured_drafts_equal_eager_drafts(checkpoints, name):
    engine, seqs = prefilled_engine(checkpoints[name], "float32")
    runner, proposer = engine.runner, engine.proposer
    scheduled = [ScheduledSeq(s, 1 + K, K) for s in seqs]
    for s in seqs:
        s.draft_token_ids = list(range(9, 9 + K))
    results = runner.execute(scheduled)
    # accept a different number of drafts per sequence (0, 1 and K): the engine appends the accepted drafts
    # and one more token, so that the MTP reads token t + 1 next to the hidden state of position t
    accepted = [0, 1, K]
    for s, r, a in zip(seqs, results, accepted):
        s.token_ids.extend(s.draft_token_ids[:a] + [11])
        s.num_computed_tokens = r.start + a + 1
    before = snapshot(runner)
    from nemoh.engine.spec_decode import DraftRequest

    requests = [DraftRequest(s, r.start, r.hidden[:a + 1], True) for s, r, a in zip(seqs, results, accepted)]
    proposer._propose_eager(requests)
    eager = [list(s.draft_token_ids) for s in seqs]
    restore(runner, before)
    captured = CapturedSteps(engine.model, runner, 4, K, engine.max_model_len)
    drafts = captured.draft(seqs, [r.start for r in requests], [r.hidden for r in requests])
    assert drafts == eager
    assert all(len(d) == K for d in drafts)


def test_engine_greedy_identical_captured_and_eager(checkpoints):
    for spec in (None, {"method": "mtp", "num_speculative_tokens": K}):
        outs = []
        for eager in (True, False):
            llm = LLM(str(checkpoints["dense"]), dtype="float32", enforce_eager=eager, cache_memory_gb=0.05,
                      max_model_len=256, speculative_config=spec)
            assert (llm.engine.runner.captured is None) == eager
            gen = torch.Generator().manual_seed(1)
            prompts = [torch.randint(3, 4000, (n,), generator=gen).tolist() for n in (7, 30, 12, 45)]
            res = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
            outs.append([r.outputs[0].token_ids for r in res])
        assert outs[0] == outs[1]

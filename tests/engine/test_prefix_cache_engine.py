"""Prefix caching through the whole engine: the same greedy tokens and logprobs with the cache on and off
(multi-turn conversations, prompts at and off block boundaries, shared system prompts, MTP, chunked prefill,
preemption, concurrent requests, FP8 KV, a cache too small for everything), and the hits it must make."""
import pytest
import torch
from engine_helpers import PROMPTS, assert_idle, greedy

LOGPROB_ATOL = 1e-5          # float32: a resumed prefill splits the scan elsewhere, as chunked prefill does
SPEC = {"method": "mtp", "num_speculative_tokens": 3}


def user_turn(t: int, n: int = 6) -> list[int]:
    """The tokens a new user message (or tool result) adds to a conversation."""
    return [500 + 7 * t + i for i in range(n)]


def converse(llm, first: list[int], turns: int, max_tokens: int = 10, turn_len=user_turn, rerender: bool = False):
    """An agent-style conversation: each turn re-sends everything so far plus a new message. rerender: as
    Nemotron's template with thinking on, the previous prompt's last token (the generation prompt's end) is
    rendered differently once it is history, so the next prompt diverges one token before the previous end.
    Returns per turn: (prompt length, cached tokens, output tokens, chosen tokens' logprobs)."""
    prompt, results = list(first), []
    for t in range(turns):
        out = llm.generate([prompt], greedy(max_tokens, logprobs=1))[0]
        c = out.outputs[0]
        assert c.finish_reason == "length", out.error
        results.append((len(prompt), out.num_cached_tokens, c.token_ids,
                        [lp[tok].logprob for lp, tok in zip(c.logprobs, c.token_ids)]))
        prompt = (prompt[:-1] + [999] if rerender else prompt) + c.token_ids + turn_len(t)
    return results


def assert_same(off, on):
    for (n_a, _, ids_a, lp_a), (n_b, _, ids_b, lp_b) in zip(off, on, strict=True):
        assert n_a == n_b and ids_a == ids_b
        assert lp_a == pytest.approx(lp_b, abs=LOGPROB_ATOL)


def assert_hits_from_turn_two(results, fraction=0.9):
    """From turn 2 on, at least `fraction` of the tokens already seen (previous prompt + reply) are cached."""
    assert results[0][1] == 0
    for (n_prev, _, out_prev, _), (_, cached, _, _) in zip(results, results[1:]):
        assert cached >= fraction * (n_prev + len(out_prev))


@pytest.mark.parametrize("kwargs", [{}, {"max_num_batched_tokens": 7}, {"speculative_config": SPEC},
                                    {"block_size": 8, "kv_cache_dtype": "fp8"}],
                         ids=["default", "chunked7", "mtp3", "block8-fp8"])
def test_multi_turn_conversation_is_identical_and_hits(make_llm, kwargs):
    first = list(range(30, 75))
    off = converse(make_llm(enable_prefix_caching=False, **kwargs), first, 4)
    on_llm = make_llm(**kwargs)
    on = converse(on_llm, first, 4)
    assert_same(off, on)
    assert_hits_from_turn_two(on)
    assert all(r[1] == 0 for r in off)
    stats = on_llm.engine.stats()
    assert stats["mamba_prefix_cache_hits_total"] == sum(r[1] for r in on)
    assert stats["mamba_prefix_cache_queries_total"] == sum(r[0] for r in on)
    assert_idle(on_llm.engine)


def test_mtp_draft_states_are_resumed_too(make_llm):
    """The MTP block's hidden states (hence its KV cache, the draft state) match a run without the cache."""
    def drafts(llm):
        seen = []
        forward = llm.engine.model.mtp_forward

        def recording(*args, **kwargs):
            h = forward(*args, **kwargs)
            if h.shape[0]:      # passes that only fill the MTP cache (a paused prefill, a finished request)
                seen.append(h.detach().clone())
            return h
        llm.engine.model.mtp_forward = recording
        # the next turns diverge right at the resume point (its MTP entry must be redone with the new token)
        return seen, converse(llm, list(range(30, 63)), 3, max_tokens=8, rerender=True)
    off, _ = drafts(make_llm(enable_prefix_caching=False, speculative_config=SPEC, enforce_eager=True))
    on, results = drafts(make_llm(speculative_config=SPEC, enforce_eager=True))
    assert [r[1] for r in results[1:]] == [r[0] - 1 for r in results[:-1]]      # resumed at the divergence
    assert len(off) == len(on)
    for a, b in zip(off, on):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kwargs", [{}, {"speculative_config": SPEC}], ids=["plain", "mtp3"])
def test_thinking_template_conversation_hits_one_token_before_the_previous_prompt_end(make_llm, kwargs):
    first = list(range(30, 75))
    off = converse(make_llm(enable_prefix_caching=False, **kwargs), first, 4, rerender=True)
    on = converse(make_llm(**kwargs), first, 4, rerender=True)
    assert_same(off, on)
    assert [r[1] for r in on] == [0] + [r[0] - 1 for r in on[:-1]]


@pytest.mark.parametrize("kwargs", [{}, {"speculative_config": SPEC}], ids=["plain", "mtp3"])
def test_prompt_lengths_at_and_off_block_boundaries(make_llm, kwargs):
    """Every prompt an exact multiple of the block size (16), then ones that end mid-block."""
    def to_boundary(t):        # the next prompt ends on a block boundary: 10 reply tokens + 22 new ones
        return user_turn(t, 22)
    first = list(range(40, 72))                      # 32 tokens
    off = converse(make_llm(enable_prefix_caching=False, **kwargs), first, 3, turn_len=to_boundary)
    on = converse(make_llm(**kwargs), first, 3, turn_len=to_boundary)
    assert [r[0] % 16 for r in on] == [0, 0, 0]
    assert_same(off, on)
    assert_hits_from_turn_two(on)
    first = list(range(40, 77))                      # 37, 37 + 10 + 5 = 52, 67: mid-block
    off = converse(make_llm(enable_prefix_caching=False, **kwargs), first, 3, turn_len=lambda t: user_turn(t, 5))
    on = converse(make_llm(**kwargs), first, 3, turn_len=lambda t: user_turn(t, 5))
    assert all(r[0] % 16 for r in on)
    assert_same(off, on)
    assert_hits_from_turn_two(on)


def test_the_same_prompt_again(make_llm):
    """A prompt sent again in full (32 tokens, two full blocks): the first run paused one token before its end
    to leave a resume point there; the next ones resume from it; every run gives the same tokens."""
    llm = make_llm()
    prompt = list(range(300, 332))
    outs = [llm.generate([prompt], greedy(8))[0] for _ in range(3)]
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert [o.num_cached_tokens for o in outs] == [0, 31, 31]


def test_shared_system_prompt_with_different_users(make_llm):
    system = list(range(600, 637))                   # 37 tokens: two full blocks and 5
    prompts = [system + [10 + u, 20 + u, 30 + u, 40 + u] for u in range(4)]
    on_llm = make_llm()
    on = [on_llm.generate([p], greedy(8, logprobs=1))[0] for p in prompts]
    off = make_llm(enable_prefix_caching=False).generate(prompts, greedy(8, logprobs=1))
    for a, b in zip(off, on):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    # user 2 finds the system prompt's blocks but no state there: its prefill pauses at 32 to save one
    assert [o.num_cached_tokens for o in on] == [0, 0, 32, 32]
    stats = on_llm.engine.stats()
    assert stats["prefix_cache_hits_total"] == 0 + 32 + 32 + 32
    assert_idle(on_llm.engine)


def test_concurrent_requests_sharing_a_prefix(make_llm):
    """Requests with one long shared prefix in the same batch, admitted at different steps (small budget)."""
    shared = list(range(700, 750))
    prompts = [shared + [u, u + 1, u + 2] for u in range(5)] + [PROMPTS[0]]
    kwargs = {"max_num_batched_tokens": 24}
    off = make_llm(enable_prefix_caching=False, **kwargs).generate(prompts, greedy(12))
    on_llm = make_llm(**kwargs)
    on = on_llm.generate(prompts, greedy(12))
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off]
    again = on_llm.generate(prompts, greedy(12))     # the second wave resumes at the shared prefix
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in off]
    assert all(o.num_cached_tokens >= 48 for o in again[:5])
    assert_idle(on_llm.engine)


@pytest.mark.parametrize("kwargs", [{}, {"speculative_config": SPEC}], ids=["plain", "mtp3"])
def test_preemption_resumes_from_the_cache(make_llm, greedy_ref, kwargs):
    # 8 blocks of 16 for 11 blocks of work: preempted sequences resume from the point they left behind (with
    # 6 blocks those points are evicted at once to make room: see test_preemption_under_a_tiny_kv_cache)
    tiny = make_llm(num_kv_blocks=8, block_size=16, **kwargs)
    outs = tiny.generate(PROMPTS, greedy())
    assert [o.outputs[0].token_ids for o in outs] == greedy_ref
    assert tiny.engine.scheduler.num_preemptions > 0
    assert tiny.engine.prefix_cache.counters.num_resumed_tokens > 0
    assert_idle(tiny.engine)


def test_a_small_cache_evicts_and_never_fails(make_llm):
    """Three conversations taking turns (two turns each in a row) through 12 KV blocks and 2 state
    snapshots: nothing fails, the cache evicts, the tokens stay the same, and there are fewer hits than with
    room for everything (the first turn of each pair finds its conversation evicted)."""
    def interleaved(llm, turns=4):
        prompts = [list(range(800 + 50 * c, 830 + 50 * c)) for c in range(3)]
        results = [[] for _ in prompts]
        order = [c for pair in range(turns // 2) for c in range(3) for _ in range(2)]
        for t, c in enumerate(order):
            out = llm.generate([prompts[c]], greedy(8))[0]
            assert out.error is None and out.outputs[0].finish_reason == "length"
            results[c].append((out.outputs[0].token_ids, out.num_cached_tokens))
            prompts[c] = prompts[c] + out.outputs[0].token_ids + user_turn(t, 4)
        return results
    off = interleaved(make_llm(enable_prefix_caching=False, max_model_len=128, num_kv_blocks=12, block_size=16))
    small_llm = make_llm(max_model_len=128, num_kv_blocks=12, block_size=16, prefix_cache_state_slots=2)
    small = interleaved(small_llm)
    big = interleaved(make_llm(max_model_len=128))
    tokens = [[ids for ids, _ in conv] for conv in off]
    assert [[ids for ids, _ in conv] for conv in small] == tokens == [[ids for ids, _ in conv] for conv in big]
    hits = lambda results: sum(n for conv in results for _, n in conv)   # noqa: E731
    assert 0 < hits(small) < hits(big)
    assert small_llm.engine.prefix_cache.counters.num_evicted > 0
    assert_idle(small_llm.engine)


def test_concurrent_sessions_through_a_tiny_cache_never_fail(make_llm):
    """Three conversations whose turns run in the same batch, through 10 KV blocks and 2 state snapshots:
    preemptions, evictions, resumes all at once; every request finishes with the tokens of a run without
    the cache."""
    def sessions(llm, turns=4):
        prompts = [list(range(900 + 40 * c, 925 + 40 * c)) for c in range(3)]
        tokens = []
        for t in range(turns):
            outs = llm.generate(prompts, greedy(8))
            assert all(o.error is None and o.outputs[0].finish_reason == "length" for o in outs)
            tokens.append([o.outputs[0].token_ids for o in outs])
            prompts = [p + o.outputs[0].token_ids + user_turn(t, 4) for p, o in zip(prompts, outs)]
        return tokens
    kwargs = dict(max_model_len=128, num_kv_blocks=10, block_size=16, max_num_batched_tokens=32)
    tiny = make_llm(prefix_cache_state_slots=2, **kwargs)
    assert sessions(tiny) == sessions(make_llm(enable_prefix_caching=False, **kwargs))
    assert tiny.engine.prefix_cache.counters.num_evicted > 0
    assert_idle(tiny.engine)


def test_prefix_caching_off(make_llm):
    llm = make_llm(enable_prefix_caching=False)
    engine = llm.engine
    assert engine.prefix_cache is None and engine.state_cache.num_snapshot_slots == 0
    assert engine.stats()["enable_prefix_caching"] is False and not engine.reset_prefix_cache()
    results = converse(llm, PROMPTS[2], 2)
    assert [r[1] for r in results] == [0, 0]


def test_reset_prefix_cache(make_llm):
    llm = make_llm()
    converse(llm, PROMPTS[2], 2)
    assert llm.engine.prefix_cache.num_points > 0
    assert llm.engine.reset_prefix_cache()
    assert llm.engine.prefix_cache.num_points == 0 and llm.engine.block_manager.num_cached_blocks == 0
    assert llm.engine.state_cache.num_used_snapshot_slots == 0
    assert converse(llm, PROMPTS[2], 1)[0][1] == 0


@pytest.fixture(scope="module")
def quantized_ckpts(ckpt, tmp_path_factory):
    from nemoh.quant.quantize import quantize_checkpoint

    root = tmp_path_factory.mktemp("prefix_quant")
    calib = root / "calib.txt"
    calib.write_text("\n".join(f"my laptop {i} cannot reach the VPN server" for i in range(8)))
    quantize_checkpoint(ckpt[0], root / "nvfp4", fmt="nvfp4", progress=False)
    quantize_checkpoint(ckpt[0], root / "fp8", fmt="fp8", calib_file=calib, calib_samples=4, progress=False)
    return {"nvfp4": str(root / "nvfp4"), "fp8": str(root / "fp8")}


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_quantized_checkpoints_resume_identically(quantized_ckpts, fmt):
    """NVFP4 / FP8 weights: the same greedy tokens with the cache on and off, and the hits."""
    from nemoh import LLM

    def make(**kwargs):
        return LLM(quantized_ckpts[fmt], dtype="float32", max_model_len=256, cache_memory_gb=0.05, max_num_seqs=16,
                   **kwargs)
    first = list(range(30, 75))
    off = converse(make(enable_prefix_caching=False), first, 3)
    on_llm = make()
    assert fmt in on_llm.engine.model.quant_config.quant_algo.lower()     # the products read packed weights
    on = converse(on_llm, first, 3)
    assert_same(off, on)
    assert_hits_from_turn_two(on)
    assert_idle(on_llm.engine)

"""Greedy outputs must not depend on how the engine schedules: HF oracle, batching, chunking, MTP, preemption."""
import pytest
import torch
from engine_helpers import PROMPTS, assert_idle, greedy

from nemoh.sampling_params import SamplingParams


def test_matches_hf_generate(ckpt, llm):
    _, hf = ckpt
    for prompt in PROMPTS[:2]:
        ours = llm.generate([prompt], greedy(32))[0].outputs[0].token_ids
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        assert ours == ref[0, len(prompt):].tolist()


def test_alone_equals_in_a_mixed_batch(llm, greedy_ref):
    # different requests, lengths and sampling settings in one batch (plus a sampled request in the middle)
    prompts = PROMPTS[:2] + [[9, 9, 9]] + PROMPTS[2:]
    params = [greedy(), greedy(), SamplingParams(temperature=1.0, seed=3, max_tokens=10), greedy(), greedy()]
    outs = llm.generate(prompts, params)
    got = [o.outputs[0].token_ids for i, o in enumerate(outs) if i != 2]
    assert got == greedy_ref
    assert_idle(llm.engine)


def test_chunked_prefill_is_invisible(make_llm, greedy_ref):
    small = make_llm(max_num_batched_tokens=5)
    outs = small.generate(PROMPTS, greedy())
    assert [o.outputs[0].token_ids for o in outs] == greedy_ref
    no_chunk = make_llm(max_num_batched_tokens=40, enable_chunked_prefill=False)
    assert [o.outputs[0].token_ids for o in no_chunk.generate(PROMPTS, greedy())] == greedy_ref


def test_preemption_under_a_tiny_kv_cache(make_llm, greedy_ref):
    # 6 blocks of 16 tokens for four requests of 5-55 tokens: they must take turns and be recomputed
    tiny = make_llm(num_kv_blocks=6, block_size=16)
    outs = tiny.generate(PROMPTS, greedy())
    assert [o.outputs[0].token_ids for o in outs] == greedy_ref
    assert tiny.engine.scheduler.num_preemptions > 0
    assert_idle(tiny.engine)


def test_mtp_speculative_greedy_is_identical(make_llm, greedy_ref):
    for k in (1, 3):
        spec = make_llm(speculative_config={"method": "mtp", "num_speculative_tokens": k})
        outs = spec.generate(PROMPTS, greedy())
        assert [o.outputs[0].token_ids for o in outs] == greedy_ref
        stats = spec.engine.stats()
        assert stats["spec_drafted_tokens_total"] > 0
        assert_idle(spec.engine)


def test_request_that_never_fits_fails_alone(make_llm, greedy_ref):
    tiny = make_llm(num_kv_blocks=3, block_size=16)    # 48 tokens of KV
    # a prompt that fits, whose output outgrows the cache, fails alone when it does
    outs = tiny.generate([PROMPTS[1], list(range(200, 240))], [greedy(), greedy(16)])
    assert outs[0].outputs[0].token_ids == greedy_ref[1]
    assert outs[1].outputs[0].finish_reason == "error" and outs[1].error
    assert_idle(tiny.engine)
    # a prompt longer than the whole cache is refused before it is queued (a 400 from the server)
    with pytest.raises(ValueError, match="prompt: 60 tokens need more KV cache than the engine has"):
        tiny.engine.add_request("too-long", prompt_token_ids=list(range(200, 260)), params=greedy())
    assert_idle(tiny.engine)


def test_packed_products_keep_greedy_output(make_llm, ckpt, greedy_ref, monkeypatch):
    """With every dense weight multiplied through its oneDNN packed copy (the tiny checkpoint's weights are
    all under PACK_MIN_ELEMENTS, so the other tests use `F.linear`): HF's greedy tokens, alone and in a batch,
    with and without MTP."""
    import nemoh.models.linear as linear_module

    monkeypatch.setattr(linear_module, "PACK_MIN_ELEMENTS", 0)
    _, hf = ckpt
    # without prefix caching: its pause before each prompt's last token sends every sampled row of this test
    # through the captured steps, and the eager product this test checks would never run
    packed = make_llm(enable_prefix_caching=False)
    prompt = PROMPTS[0]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert packed.generate([prompt], greedy(32))[0].outputs[0].token_ids == ref[0, len(prompt):].tolist()
    assert [o.outputs[0].token_ids for o in packed.generate(PROMPTS, greedy())] == greedy_ref
    spec = make_llm(speculative_config={"method": "mtp", "num_speculative_tokens": 3})
    assert [o.outputs[0].token_ids for o in spec.generate(PROMPTS, greedy())] == greedy_ref
    lm_head = packed.engine.model.lm_head.packed_weight
    assert not linear_module.PACKED_DTYPES or lm_head.packed is not None        # the packed path did run


def test_cpu_packed_weights_switch_and_memory_estimate(make_llm, greedy_ref, monkeypatch):
    """cpu_packed_weights=False keeps every product on F.linear (no copy is made); on, the runner counts the
    copies' memory before it sizes the caches from the free memory."""
    import nemoh.models.linear as linear_module

    monkeypatch.setattr(linear_module, "PACK_MIN_ELEMENTS", 0)
    off = make_llm(cpu_packed_weights=False)
    assert off.engine.runner.packed_bytes == 0
    assert [o.outputs[0].token_ids for o in off.generate(PROMPTS, greedy())] == greedy_ref
    assert all(c.packed is None for c in linear_module.packed_copies(off.engine.model))
    on = make_llm(enable_prefix_caching=False)     # (see test_packed_products_keep_greedy_output)
    if linear_module.PACKED_DTYPES:
        model = on.engine.model
        dense = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, linear_module.Linear))
        assert on.engine.runner.packed_bytes == dense
        on.generate(PROMPTS[:1], greedy(2))
        assert model.lm_head.packed_weight.packed is not None

"""Sampling features through the whole engine: seeds, stop strings, min_tokens, logprobs, n > 1, abort, limits."""
import pytest
import torch
from engine_helpers import PROMPTS, assert_idle, greedy

from nemoh.engine import llm_engine
from nemoh.engine.sampler import compute_logprobs
from nemoh.sampling_params import SamplingParams


def test_seeded_sampling_is_reproducible_across_batches(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=8), greedy(12), SamplingParams(temperature=0.7, seed=5)]
    batch = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]], [others[0], params, others[1], others[2]])
    assert batch[1].outputs[0].token_ids == alone
    different_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate([PROMPTS[0]], different_seed)[0].outputs[0].token_ids != alone


def test_stop_string_spanning_tokens(llm):
    tok = llm.get_tokenizer()
    out = llm.generate([PROMPTS[0]], greedy(24))[0].outputs[0]
    ids, full = out.token_ids, out.text
    assert full == tok.decode(ids)
    stop = None
    for i in range(2, len(ids) - 2):
        head = tok.decode(ids[:i])
        if full.startswith(head) and 2 <= len(head) <= len(full) - 2:
            cand = full[len(head) - 2:len(head) + 2]
            if "\ufffd" not in cand and cand.strip() and full.find(cand) == len(head) - 2:
                stop = cand
                break
    assert stop is not None, "no usable token boundary in the greedy text"
    res = llm.generate([PROMPTS[0]], greedy(24, stop=[stop]))[0].outputs[0]
    assert res.finish_reason == "stop" and res.stop_reason == stop
    assert res.text == full[: full.find(stop)]
    assert res.token_ids == ids[: len(res.token_ids)] and len(res.token_ids) < len(ids)


def test_stop_token_ids_eos_and_min_tokens(llm, greedy_ref):
    ref = greedy_ref[0]
    out = llm.generate([PROMPTS[0]], greedy(stop_token_ids=[ref[1]]))[0].outputs[0]
    assert out.token_ids == ref[:2] and out.finish_reason == "stop" and out.stop_reason == ref[1]
    out = llm.generate([PROMPTS[0]], greedy(stop_token_ids=[ref[1]], min_tokens=4))[0].outputs[0]
    assert len(out.token_ids) >= 4 and ref[1] not in out.token_ids[:3]
    engine = llm.engine
    saved = engine.eos_token_ids
    engine.eos_token_ids = [ref[2]]          # pretend the model's eos is the third greedy token
    try:
        eos = SamplingParams(temperature=0, max_tokens=24)
        out = llm.generate([PROMPTS[0]], eos)[0].outputs[0]
        assert out.token_ids == ref[:3] and out.finish_reason == "stop" and out.stop_reason is None
        out = llm.generate([PROMPTS[0]], greedy())[0].outputs[0]       # ignore_eos
        assert out.token_ids == ref
    finally:
        engine.eos_token_ids = saved
    out = llm.generate([PROMPTS[0]], greedy(5))[0].outputs[0]
    assert out.finish_reason == "length" and out.token_ids == ref[:5]


def test_logprobs_match_the_model(llm, ckpt):
    out = llm.generate([PROMPTS[1]], greedy(6, logprobs=3))[0].outputs[0]
    model = llm.engine.model
    seq = PROMPTS[1] + out.token_ids
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([seq]))[0], dim=-1)
    assert len(out.logprobs) == 6
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(PROMPTS[1]) - 1 + i]
        assert len(lp) == 3 and lp[tok].rank == 1                 # greedy: the chosen one is the top one
        top = torch.topk(row, 3)
        assert list(lp) [0] == tok and set(lp) == set(top.indices.tolist())
        for t, entry in lp.items():
            assert abs(entry.logprob - float(row[t])) < 1e-4
            assert entry.decoded_token is not None
    assert abs(out.cumulative_logprob - sum(lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs))) < 1e-5


def test_n_completions(llm, greedy_ref):
    out = llm.generate([PROMPTS[0]], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2] and all(len(c.token_ids) == 10 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    again = llm.generate([PROMPTS[0]], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    out = llm.generate([PROMPTS[0]], greedy(n=2))[0]
    assert [c.token_ids for c in out.outputs] == [greedy_ref[0], greedy_ref[0]]
    assert_idle(llm.engine)


def test_text_prompts_and_validation(llm):
    out = llm.generate("Hello world", greedy(4))[0]
    assert out.prompt == "Hello world" and out.prompt_token_ids == llm.get_tokenizer().encode("Hello world").ids
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([list(range(300))], greedy(4))
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate([PROMPTS[0]], greedy(250))
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[1, 2, 10 ** 6]], greedy(4))
    assert_idle(llm.engine)


def test_abort_returns_every_block_and_slot(llm):
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"ab{i}", prompt_token_ids=p, params=greedy(50))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0 and engine.state_cache.num_used_slots > 0
    outs = [engine.abort_request(f"ab{i}") for i in range(len(PROMPTS))]
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert_idle(engine)
    assert engine.step() == []


def test_cache_dtypes(make_llm, greedy_ref):
    import torch as _torch

    fp8 = make_llm(kv_cache_dtype="fp8", mamba_ssm_cache_dtype="float16")
    runner = fp8.engine.runner
    assert all(k.dtype == _torch.float8_e4m3fn for k, _ in runner.kv_caches.values())
    assert all(s.dtype == _torch.float16 for _, s in runner.mamba_caches.values())
    out = fp8.generate(PROMPTS[:2], greedy(8))
    assert all(len(o.outputs[0].token_ids) == 8 for o in out)
    assert_idle(fp8.engine)


def test_engine_args_validation(make_llm, llm):
    from nemoh.engine.config import EngineArgs

    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineArgs(kv_cache_dtype="int3")
    with pytest.raises(ValueError, match="cpu_packed_weights"):
        EngineArgs(cpu_packed_weights="no")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineArgs(speculative_config={"method": "mtp", "num_speculative_tokens": 0})
    with pytest.raises(ValueError, match="unknown engine arguments"):
        make_llm(max_num_seq=3)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate([PROMPTS[0]], SamplingParams(prompt_logprobs=1))


def test_chat_renders_the_template(llm):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    outs = llm.chat([msgs, msgs], greedy(4), chat_template_kwargs={"enable_thinking": False})
    assert len(outs) == 2 and outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert outs[0].prompt.endswith("<|im_start|>assistant\n<think></think>")
    assert outs[0].prompt_token_ids == llm.get_tokenizer().encode(outs[0].prompt, add_special_tokens=False).ids


def test_max_model_len_past_the_checkpoint_warns_with_both_numbers(make_llm, ckpt, caplog):
    cfg_len = make_llm().engine.model_config.max_position_embeddings
    caplog.clear()
    with caplog.at_level("WARNING", logger="nemoh.engine.llm_engine"):
        make_llm(max_model_len=cfg_len)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="nemoh.engine.llm_engine"):
        make_llm(max_model_len=cfg_len * 2)
    (record,) = caplog.records
    assert f"max_model_len {cfg_len * 2}" in record.getMessage()
    assert f"max_position_embeddings {cfg_len}" in record.getMessage()


def test_tokenizer_and_template_from_another_directory(make_llm, ckpt, tmp_path):
    import shutil

    from checkpoints import DEMO_DIR

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(DEMO_DIR / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}<{{ m.content }}>{% endfor %}")
    llm = make_llm(tokenizer=str(tmp_path))
    out = llm.chat([{"role": "user", "content": "hi"}], greedy(2))
    assert out[0].prompt == "<hi>"
    with pytest.raises(ValueError, match="tokenizer: .* has no tokenizer.json"):
        make_llm(tokenizer=str(tmp_path / "nowhere"))


def test_enforce_eager_is_an_engine_arg():
    from nemoh.engine.config import EngineArgs

    assert EngineArgs().enforce_eager is False and EngineArgs(enforce_eager=True).enforce_eager is True
    with pytest.raises(ValueError, match="enforce_eager"):
        EngineArgs(enforce_eager="yes")


@pytest.mark.parametrize("failing", ["sampling", "logprobs"])
def test_a_failing_row_of_the_batched_sampler_fails_only_its_request(llm, greedy_ref, monkeypatch, failing):
    """The rows of a step are sampled (and their logprobs taken) in one call; when it fails, each sequence does it
    on its own, so the others keep their outputs (a seeded one its tokens) and only the failing request errors."""
    engine = llm.engine
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=8, ignore_eos=True, logprobs=2)
    alone = llm.generate([PROMPTS[0]], seeded)[0].outputs[0]
    bad = SamplingParams(temperature=0.8, presence_penalty=0.25, max_tokens=8, ignore_eos=True, logprobs=5)
    calls = []
    if failing == "sampling":
        process = engine.sampler.process

        def faulty(logits, rows, masks=None):
            calls.append(len(rows))
            if any(r.params is bad for r in rows) and len(calls) > 3:
                raise RuntimeError("injected")
            return process(logits, rows, masks)

        monkeypatch.setattr(engine.sampler, "process", faulty)
    else:
        def faulty(logits, token_ids, num_top):
            calls.append(len(token_ids))
            if bad.logprobs in num_top and len(calls) > 3:
                raise RuntimeError("injected")
            return compute_logprobs(logits, token_ids, num_top)

        monkeypatch.setattr(llm_engine, "compute_logprobs", faulty)
    out = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [seeded, bad, greedy(8)])
    assert out[0].outputs[0].token_ids == alone.token_ids
    # the same tokens; their logprobs only as close as the logits of a batch and of one sequence are
    for got, ref in zip(out[0].outputs[0].logprobs, alone.logprobs, strict=True):
        assert list(got) == list(ref) and all(abs(got[t].logprob - ref[t].logprob) < 1e-5 for t in got)
    assert out[1].outputs[0].finish_reason == "error" and "injected" in out[1].error
    assert len(out[1].outputs[0].token_ids) >= 1
    assert out[2].outputs[0].token_ids == greedy_ref[2][:8]
    assert max(calls) == 2                           # the seeded and the bad row, in one batched call
    assert_idle(engine)

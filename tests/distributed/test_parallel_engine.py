"""The engine at TP2 (spawned worker process, gloo): greedy generation with MTP drafts and roll-backs equals one
rank's token for token, with tensor and with expert parallelism; a worker's death is seen at once."""
from __future__ import annotations

import os
import signal
import time

import pytest

from nemoh import LLM, SamplingParams

PROMPTS = [[5, 17, 300, 42, 9, 1000, 7], [3, 4, 5], list(range(100, 140))]
KW = dict(dtype="float32", speculative_config={"method": "mtp", "num_speculative_tokens": 2}, num_kv_blocks=64,
          num_state_slots=8, max_model_len=256)


def generate(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10))]


@pytest.fixture(scope="module")
def reference(tp_checkpoints):
    return generate(LLM(tp_checkpoints["f32"], **KW))


@pytest.mark.parametrize("ep", [False, True])
def test_tp2_greedy_equals_one_rank(tp_checkpoints, reference, ep):
    llm = LLM(tp_checkpoints["f32"], tensor_parallel_size=2, enable_expert_parallel=ep, **KW)
    try:
        assert llm.engine.runner.captured is None             # the captured steps are single-rank: eager
        assert generate(llm) == reference
        assert llm.engine.spec_stats.num_drafted > 0           # the MTP drafts went through the workers too
        assert llm.engine.model.tp.stats.calls > 0
    finally:
        llm.engine.close()
    assert all(p.exitcode is not None for p in llm.engine.parallel.workers.processes)   # close ends the workers


def test_worker_death_is_seen(tp_checkpoints):
    llm = LLM(tp_checkpoints["f32"], tensor_parallel_size=2, **KW)
    try:
        assert llm.engine.workers_alive()
        os.kill(llm.engine.parallel.workers.processes[0].pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while llm.engine.workers_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not llm.engine.workers_alive()
        with pytest.raises(Exception):
            for _ in range(4):                                # fails the batch, then raises as fatal
                llm.engine.add_request(f"r{_}", prompt=[1, 2, 3], params=SamplingParams(max_tokens=2))
                llm.engine.step()
    finally:
        llm.engine.close()


def converse(llm: LLM, turns: int = 3) -> list[tuple[int, list[int], list[float]]]:
    """An agent-style conversation through the prefix cache: each turn re-sends everything with the previous
    prompt's last token re-rendered (as Nemotron's template does), so turns 2+ resume one token before the
    previous prompt's end (a copied block, a snapshot copy, the resume point's MTP hidden)."""
    prompt, out = list(range(30, 75)), []
    for t in range(turns):
        o = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1))[0]
        c = o.outputs[0]
        out.append((o.num_cached_tokens, c.token_ids, [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]))
        prompt = prompt[:-1] + [999] + o.outputs[0].token_ids + [500 + 7 * t + i for i in range(6)]
    return out


def test_tp2_prefix_caching_resumes_like_one_rank(tp_checkpoints):
    one = converse(LLM(tp_checkpoints["f32"], **KW))
    llm = LLM(tp_checkpoints["f32"], tensor_parallel_size=2, **KW)
    try:
        assert llm.engine.prefix_cache is not None
        two = converse(llm)
    finally:
        llm.engine.close()
    assert [ids for _, ids, _ in two] == [ids for _, ids, _ in one]
    assert [c for c, _, _ in two] == [c for c, _, _ in one] and all(c > 0 for c, _, _ in two[1:])
    for (_, _, a), (_, _, b) in zip(one, two):
        assert a == pytest.approx(b, abs=1e-5)

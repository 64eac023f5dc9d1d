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

"""AsyncLLMEngine: streaming, bounded queue, abort, per-request error isolation, fatal errors, shutdown."""
import asyncio

import pytest
from engine_helpers import PROMPTS, assert_idle, greedy

from nemoh.engine.async_engine import AsyncLLMEngine
from nemoh.engine.llm_engine import LLMEngine
from nemoh.engine.outputs import EngineDeadError, EngineError, QueueFullError


@pytest.fixture
def make_async(ckpt):
    engines = []

    def make(**kwargs):
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("max_model_len", 256)
        kwargs.setdefault("cache_memory_gb", 0.05)
        eng = AsyncLLMEngine(LLMEngine.from_pretrained(ckpt[0], **kwargs))
        engines.append(eng)
        return eng
    yield make
    for eng in engines:
        eng._stopping = True
        eng._wakeup.set()
        eng._thread.join(5)


async def collect(it):
    outs = []
    async for out in it:
        outs.append(out)
    return outs


def test_streams_match_offline(make_async, greedy_ref):
    eng = make_async()

    async def main():
        its = [eng.generate(p, greedy(), f"r{i}") for i, p in enumerate(PROMPTS)]
        return await asyncio.gather(*(collect(it) for it in its))

    results = asyncio.run(main())
    for outs, ref in zip(results, greedy_ref):
        assert outs[-1].finished and outs[-1].outputs[0].token_ids == ref
        lens = [len(o.outputs[0].token_ids) for o in outs]
        assert lens == sorted(lens) and len(outs) > 1          # streamed, cumulative
    stats = eng.stats()
    assert stats["generation_tokens_total"] >= 4 * 24 and stats["is_healthy"]
    assert stats["kv_blocks_used"] == 0 and stats["mamba_slots_used"] == 0


def test_queue_full_and_abort_frees(make_async):
    eng = make_async(max_num_seqs=1, max_waiting_requests=2)

    async def main():
        accepted, rejected = [], 0
        for i in range(5):
            try:
                accepted.append((f"q{i}", eng.generate(PROMPTS[0], greedy(200), f"q{i}")))
            except QueueFullError:
                rejected += 1
        assert len(accepted) <= 3 and rejected >= 2
        first = accepted[0][1]
        out = await first.__anext__()                           # the first request is running
        assert not out.finished
        for rid, _ in accepted:
            await eng.abort(rid)
        finals = [(await collect(it)) for _, it in accepted[1:]]
        rest = await collect(first)
        assert rest[-1].outputs[0].finish_reason == "abort"
        for outs in finals:
            assert outs[-1].finished
        await asyncio.sleep(0.2)

    asyncio.run(main())
    assert_idle(eng.engine)


def test_client_leaving_aborts(make_async):
    eng = make_async()

    async def main():
        it = eng.generate(PROMPTS[0], greedy(200), "gone")
        await it.__anext__()
        await it.aclose()                                      # the client disconnected
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not eng.engine.requests:
                break

    asyncio.run(main())
    assert_idle(eng.engine)


def test_error_in_one_request_fails_only_that_request(make_async, greedy_ref):
    eng = make_async()
    engine = eng.engine
    original = engine._append_token

    def faulty(seq, token, logprob):
        if seq.request_id == "bad" and seq.num_output_tokens >= 2:
            raise RuntimeError("injected")
        return original(seq, token, logprob)

    engine._append_token = faulty

    async def main():
        good = [eng.generate(p, greedy(), f"good{i}") for i, p in enumerate(PROMPTS[:2])]
        bad = eng.generate(PROMPTS[2], greedy(), "bad")
        results = await asyncio.gather(*(collect(it) for it in good), collect(bad), return_exceptions=True)
        return results

    results = asyncio.run(main())
    assert isinstance(results[2], EngineError) and "injected" in str(results[2])
    assert [r[-1].outputs[0].token_ids for r in results[:2]] == greedy_ref[:2]
    assert eng.is_healthy()
    assert_idle(engine)


def test_fatal_error_kills_the_engine_cleanly(make_async):
    eng = make_async()

    def broken():
        raise RuntimeError("scheduler bug")

    async def main():
        eng.engine.scheduler.schedule = broken
        it = eng.generate(PROMPTS[0], greedy(), "x")
        with pytest.raises(EngineDeadError):
            await collect(it)
        assert not eng.is_healthy()
        with pytest.raises(EngineDeadError):
            eng.generate(PROMPTS[0], greedy(), "y")

    asyncio.run(asyncio.wait_for(main(), 10))


def test_validation_and_shutdown(make_async):
    eng = make_async()

    async def main():
        with pytest.raises(ValueError):
            eng.generate(list(range(300)), greedy(), "long")
        it = eng.generate(PROMPTS[1], greedy(8), "a")
        with pytest.raises(ValueError):
            eng.generate(PROMPTS[1], greedy(8), "a")               # duplicate id
        task = asyncio.ensure_future(collect(it))
        await eng.shutdown(drain_timeout=10)
        outs = await task
        assert outs[-1].outputs[0].finish_reason == "length"     # drained, not cut
        with pytest.raises((EngineError, EngineDeadError)):
            eng.generate(PROMPTS[1], greedy(8), "b")

    asyncio.run(asyncio.wait_for(main(), 30))


def _slow_prefill(eng, seconds_per_token: float) -> None:
    """A synthetic machine load: every prompt token a step prefills costs `seconds_per_token` more (a sleep, so
    the GIL is free: what is measured is the step's length, as on a loaded machine where steps took seconds)."""
    runner = eng.engine.runner
    execute = runner.execute

    def slow(scheduled):
        import time
        time.sleep(seconds_per_token * sum(s.num_new_tokens for s in scheduled
                                           if not s.num_draft_tokens and s.num_new_tokens > 1))
        return execute(scheduled)

    runner.execute = slow


@pytest.mark.parametrize("max_step_seconds", [0.25, None])
def test_an_abort_waits_for_no_long_prefill_step(make_async, max_step_seconds):
    """A burst of prompts arrives while a stream runs; the stream's client leaves during the burst's prefill.
    Prefilling the burst in one step takes ~2.4 s here: the abort, which takes effect between two steps, would
    wait for it. With a step time budget the prefill is cut into chunks of about 0.25 s and the abort comes
    within a second; without one (the control case) it waits for the whole step."""
    eng = make_async(max_num_seqs=8, max_model_len=512, max_step_seconds=max_step_seconds)
    _slow_prefill(eng, 0.002)
    greedy_params = dict(temperature=0.0)

    async def main():
        from nemoh.sampling_params import SamplingParams
        import time

        victim = eng.generate([5, 6, 7], SamplingParams(max_tokens=300, ignore_eos=True, **greedy_params), "victim")
        await victim.__anext__()                                      # running, one token out
        burst = [eng.generate([10 + i] * 200, SamplingParams(max_tokens=2, **greedy_params), f"b{i}")
                 for i in range(6)]
        consumers = [asyncio.ensure_future(collect(b)) for b in burst]
        await asyncio.sleep(0.3)                                      # the burst's prefill is under way
        start = time.monotonic()
        await eng.abort("victim")
        last = None
        async for last in victim:
            pass
        waited = time.monotonic() - start
        await asyncio.gather(*consumers)
        return waited, last

    waited, last = asyncio.run(main())
    assert last is not None and last.finished and last.outputs[0].finish_reason == "abort"
    if max_step_seconds is None:
        assert waited > 1.0, waited       # the control: the abort did wait for the long step
    else:
        assert waited < 1.0, waited
    assert_idle(eng.engine)

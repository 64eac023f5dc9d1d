"""Engine test helpers shared by the engine tests."""
from nemoh.sampling_params import SamplingParams

PROMPTS = [list(range(20, 40)), [5, 300, 301, 302, 7, 1000, 12, 13], list(range(100, 161, 2)), [42] * 5]


def greedy(max_tokens=24, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def assert_idle(engine):
    assert engine.block_manager.num_used_blocks == 0
    assert engine.state_cache.num_used_slots == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert not engine.requests

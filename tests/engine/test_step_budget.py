"""The step time budget: the prefill cap follows the measured step times, within its bounds."""
import pytest

from nemoh.engine.config import EngineArgs
from nemoh.engine.step_budget import StepTimeBudget


def test_cap_shrinks_after_slow_prefill_steps_and_grows_back():
    b = StepTimeBudget(0.25, max_tokens=2048, cap=2048)
    assert StepTimeBudget(0.25, max_tokens=2048).limit() == 64     # nothing measured yet: start small
    b.record(2.0, 2048)                  # 8x over: about an eighth fits
    assert b.limit() == 256
    b.record(0.05, 0)                    # decode-only steps do not move the cap
    assert b.limit() == 256
    b.record(0.1, 100)                   # a fast step the cap did not limit: no news
    assert b.limit() == 256
    b.record(0.1, 256)                   # a fast step the cap limited: at most twice as many
    assert b.limit() == 512
    for _ in range(5):
        b.record(0.01, b.limit())
    assert b.limit() == 2048             # never above the step's token budget


def test_cap_never_below_the_minimum_and_aligned():
    b = StepTimeBudget(0.25, max_tokens=2048, min_tokens=64, align=16, cap=2048)
    b.record(30.0, 2048)
    assert b.limit() == 64
    b = StepTimeBudget(0.25, max_tokens=2048, cap=2048)
    b.record(0.5, 1000)
    assert b.limit() % 16 == 0 and 400 <= b.limit() <= 500


def test_engine_args_validate_the_budget():
    assert EngineArgs(max_step_seconds=0.25).max_step_seconds == 0.25
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="max_step_seconds"):
            EngineArgs(max_step_seconds=bad)

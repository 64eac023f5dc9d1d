"""`nemoh serve` with faults injected by request seed, for fault-injection runs (faults.py, tests/server).

    python benchmarks/reliability/faulty_serve.py serve [nemoh serve flags]

- seed 666: the engine raises while postprocessing that request's tokens (a bug hit by one request): that
  request must fail alone;
- seed 777: the engine loop itself raises on its next step (a fatal engine error): /health must turn non-200
  and the process must exit non-zero.
Everything else is the real server.
"""
from __future__ import annotations

import sys

from nemoh.cli import main
from nemoh.engine.llm_engine import LLMEngine

FAIL_SEED = 666
FATAL_SEED = 777

_postprocess = LLMEngine._postprocess
_step = LLMEngine.step


def postprocess_with_fault(self, r, sampled):
    if r.scheduled.seq.params.seed == FAIL_SEED:
        raise RuntimeError("injected fault while postprocessing one request")
    return _postprocess(self, r, sampled)


def step_with_fatal_error(self):
    if any(req.params.seed == FATAL_SEED for req in self.requests.values()):
        raise RuntimeError("injected fatal engine error")
    return _step(self)


if __name__ == "__main__":
    LLMEngine._postprocess = postprocess_with_fault
    LLMEngine.step = step_with_fatal_error
    sys.exit(main(sys.argv[1:]))

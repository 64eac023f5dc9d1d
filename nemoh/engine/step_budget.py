"""A time budget for engine steps: how many prompt tokens the next step may prefill.

Everything the server does to a running request between two steps waits for the step in progress: an abort
(a client that left) frees the request's KV blocks and Mamba slot only after it, and every stream's next token
comes after it. A step that prefills a whole burst of prompts (2,048 tokens) took 0.4-8 s on 2 shared cores,
so a dropped stream was aborted seconds after its client left (docs/reliability.md). Decode steps are short;
prefill chunks are what make a step long, and chunked prefill can cut them anywhere.

So the engine caps each step's prefill tokens, adapting the cap to the step times it measures (the machine's
load changes them by 10x): after a step with prefill that took longer than the budget, the cap becomes the
number of tokens that would have fitted, assuming the prefill part's time is proportional to its tokens; after
a fast step that the cap limited, it doubles at most. It never goes below `min_tokens` (a step's fixed costs
do not shrink with the chunk, and a prompt must still progress) nor above the step's token budget. It starts
at the minimum, so the first burst after start-up does not make a long step before anything was measured.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepTimeBudget:
    seconds: float                 # the step time aimed at
    max_tokens: int                # the scheduler's per-step token budget (max_num_batched_tokens)
    min_tokens: int = 64
    align: int = 16                # caps are multiples of this (the KV block size)
    cap: int = 0                   # prefill tokens allowed in the next step
    decode_seconds: float = 0.0    # moving average of steps without prefill: the part a cap cannot shrink

    def __post_init__(self) -> None:
        self.min_tokens = min(self.min_tokens, self.max_tokens)
        # start small: the first step of a burst is as long as any, and there is no measurement yet
        self.cap = self.cap or self.min_tokens

    def limit(self) -> int:
        """Prefill tokens the next step may take."""
        return self.cap

    def record(self, seconds: float, num_prefill_tokens: int) -> None:
        """Account for a step that took `seconds` and prefilled `num_prefill_tokens` prompt tokens."""
        if num_prefill_tokens <= 0:
            self.decode_seconds = 0.8 * self.decode_seconds + 0.2 * seconds if self.decode_seconds else seconds
            return
        base = min(self.decode_seconds, 0.5 * self.seconds, 0.5 * seconds)
        fits = int(num_prefill_tokens * (self.seconds - base) / max(seconds - base, 1e-6))
        if seconds > self.seconds:
            cap = min(self.cap, fits)
        elif num_prefill_tokens >= self.cap:
            cap = max(self.cap, min(fits, 2 * self.cap))
        else:
            return
        cap = cap // self.align * self.align
        self.cap = max(self.min_tokens, min(self.max_tokens, cap))

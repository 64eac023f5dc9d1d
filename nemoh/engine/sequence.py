"""A request and its sequences: the engine's bookkeeping for one prompt and its n completions.

The scheduler works on `Sequence`s (one per completion); a `Request` groups the n sequences of one prompt
so that the engine can report them together. A sequence's tokens are `token_ids = prompt + output`;
`num_computed_tokens` of them are in the caches. In decode exactly one token (the last sampled one) is not
yet computed; after a preemption the whole sequence is recomputed as if it were a prompt (from the prefix cache's
resume point saved at the preemption, when there is one).
"""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from nemoh.engine.outputs import Logprob
from nemoh.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_counter = itertools.count()


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, arrival_time: float, generator: torch.Generator | None = None):
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.index = index                                 # completion index within the request
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.params = params
        self.max_tokens = max_tokens                       # resolved against max_model_len
        self.arrival_time = arrival_time
        self.generator = generator                         # per-sequence RNG when the request has a seed
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.state_slot: int | None = None
        self.draft_token_ids: list[int] = []               # MTP proposals to verify in the next step
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.detokenizer = None                            # set by the engine (IncrementalDetokenizer)
        # prefix caching (nemoh.engine.prefix_cache)
        self.block_hashes: list[bytes] = []                # [j]: chained hash of the tokens of blocks 0..j
        self.num_hashed_blocks = 0                         # leading blocks of block_table registered by hash
        self.num_cached_tokens = 0                         # prompt tokens resumed from the cache when admitted
        self.resume_hidden: torch.Tensor | None = None     # MTP: main-model hidden at the resume point's last
                                                           # position, for the first MTP pass after resuming
        self.last_hidden: torch.Tensor | None = None       # MTP: main-model hidden at the last computed position
        self.pause_at: list[int] = []                      # prefill chunks end here, to save resume points
                                                           # (ascending; see PrefixCache.lookup)
        self.grammar = None                                # GrammarState of a constrained sequence (guided.py)

    # ---- lengths ------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def preempt(self) -> None:
        """Back to waiting, to be recomputed (or resumed from the prefix cache) from its first token."""
        self.num_computed_tokens = 0
        self.draft_token_ids = []
        self.resume_hidden = None
        self.last_hidden = None
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        # its block table will be rebuilt: whatever remembers a sequence by id across steps (the captured steps'
        # block-table rows) must not take the new table for a longer version of the old one
        self.seq_id = next(_seq_counter)

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.draft_token_ids = []

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, status={self.status.value})")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    error: str | None = None

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

"""Continuous batching with chunked prefill, FCFS, and preemption by recompute.

Each step has a token budget (`max_num_batched_tokens`). Running sequences are served first, in arrival
order: a decoding sequence takes 1 token (plus its speculative drafts), a sequence still in prefill takes the
next chunk of its prompt. Waiting sequences are then admitted in arrival order while the budget, the
`max_num_seqs` limit and the caches allow. So one step freely mixes decode tokens and prefill chunks.

When a running sequence cannot grow because the KV cache is full, the most recently arrived running
sequence is preempted: its blocks and state slot are freed and it goes back to the front of the waiting
queue to be recomputed later from its prompt plus the tokens it already generated. A sequence that could not
fit even with the whole cache to itself is failed instead of retried forever.

With a prefix cache (nemoh.engine.prefix_cache), a waiting sequence starts from the longest cached resume
point of its tokens, and its prefill chunks end at `seq.pause_at`, where the cache saves resume points; a
preempted sequence leaves a resume point behind.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from nemoh.engine.kv_cache import BlockManager, blocks_for
from nemoh.engine.prefix_cache import PrefixCache
from nemoh.engine.sequence import Sequence, SequenceStatus
from nemoh.engine.state_cache import StateCache


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int          # tokens fed to the model this step, drafts included
    num_draft_tokens: int = 0    # speculative drafts among them (verification when > 0)

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence, so its last logits give a new token."""
        seq = self.seq
        return seq.num_computed_tokens + self.num_new_tokens - self.num_draft_tokens == seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)      # could never fit: finish with an error

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_prefill_tokens(self) -> int:
        """Prompt tokens of the step (prefill chunks; a decode's one token and its drafts are not counted)."""
        return sum(s.num_new_tokens for s in self.scheduled if not s.num_draft_tokens and s.num_new_tokens > 1)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, state_cache: StateCache, max_num_seqs: int,
                 max_num_batched_tokens: int, enable_chunked_prefill: bool = True, num_lookahead_tokens: int = 0,
                 prefix_cache: PrefixCache | None = None):
        self.block_manager = block_manager
        self.prefix_cache = prefix_cache
        self.state_cache = state_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        # KV room kept past the verified tokens for the MTP drafts written after this step
        self.num_lookahead_tokens = num_lookahead_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue management -----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and give back its blocks and slot."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        self.state_cache.free(seq)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------------------------
    def _kv_tokens_needed(self, seq: Sequence, num_new: int, num_drafts: int, start: int | None = None) -> int:
        start = seq.num_computed_tokens if start is None else start
        reaches_end = start + num_new - num_drafts == seq.num_tokens
        return start + num_new + (self.num_lookahead_tokens if reaches_end else 0)

    @staticmethod
    def _chunk(seq: Sequence, start: int, budget: int) -> int:
        """Prompt tokens to compute from `start` this step: up to the budget, and not past a pause point."""
        num_new = min(seq.num_tokens - start, budget)
        pause = next((p for p in seq.pause_at if p > start), None)
        return num_new if pause is None else min(num_new, pause - start)

    def _must_wait(self, uncomputed: int, budget: int) -> bool:
        """Without chunked prefill a prompt waits for a step with room for all of it (longer ones are chunked)."""
        return (not self.enable_chunked_prefill and budget < uncomputed <= self.max_num_batched_tokens)

    def _never_fits(self, seq: Sequence, num_tokens: int) -> bool:
        return blocks_for(num_tokens, self.block_manager.block_size) > self.block_manager.num_blocks

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.save(seq, seq.last_hidden)
        self.block_manager.free(seq)
        self.state_cache.free(seq)
        seq.preempt()
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def schedule(self, max_prefill_tokens: int | None = None) -> SchedulerOutput:
        """One step's batch. `max_prefill_tokens` caps the prompt tokens of the step (chunks of running prefills
        and admitted prompts; with chunked prefill only), under the step's token budget; decode tokens and their
        drafts are not capped by it (the engine sets it to bound a step's time: nemoh/engine/step_budget.py)."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        prefill_budget = budget if max_prefill_tokens is None or not self.enable_chunked_prefill \
            else max(1, max_prefill_tokens)
        pending = list(self.running)          # running sequences not yet considered, in arrival order
        kept: list[Sequence] = []             # running sequences that stay running after this step
        while pending:
            seq = pending.pop(0)
            uncomputed = seq.num_uncomputed_tokens
            if budget == 0 or self._must_wait(uncomputed, budget):
                kept.append(seq)
                continue
            if uncomputed == 1:
                # never verify more drafts than the request may still emit (drafts + 1 bonus token)
                room = min(budget, seq.max_tokens - seq.num_output_tokens) - 1
                seq.draft_token_ids = seq.draft_token_ids[: max(room, 0)]
                num_drafts = len(seq.draft_token_ids)
                num_new = 1 + num_drafts
            else:
                if prefill_budget == 0:
                    kept.append(seq)
                    continue
                seq.draft_token_ids = []
                num_drafts, num_new = 0, self._chunk(seq, seq.num_computed_tokens, min(budget, prefill_budget))
            need = self._kv_tokens_needed(seq, num_new, num_drafts)
            if self._never_fits(seq, need):
                self._fail(seq, out)
                continue
            while not self.block_manager.can_allocate(seq, need) and pending:
                self._preempt(pending.pop(), out)        # the latest arrival gives way
            if not self.block_manager.can_allocate(seq, need):
                self._preempt(seq, out)
                continue
            self.block_manager.allocate(seq, need)
            kept.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new, num_drafts))
            budget -= num_new
            if not num_drafts and uncomputed > 1:
                prefill_budget -= num_new
        self.running = kept

        # Admit waiting sequences (FCFS: stop at the first that does not fit; none after a preemption).
        while (self.waiting and budget > 0 and prefill_budget > 0 and not out.preempted
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            if self._never_fits(seq, seq.num_tokens + self.num_lookahead_tokens):
                self.waiting.popleft()
                self._fail(seq, out)
                continue
            point = self.prefix_cache.lookup(seq) if self.prefix_cache is not None else None
            start = point.num_tokens if point is not None else 0
            shared, num_copies = self.prefix_cache.blocks_to_share(point) if point is not None else ([], 0)
            if self._must_wait(seq.num_tokens - start, budget):
                break
            num_new = self._chunk(seq, start, min(budget, prefill_budget))
            need = self._kv_tokens_needed(seq, num_new, 0, start)
            if not self.state_cache.can_allocate(seq) or not self.block_manager.can_allocate(seq, need, shared,
                                                                                             num_copies):
                break
            self.waiting.popleft()
            self.state_cache.allocate(seq)
            if self.prefix_cache is not None:
                self.prefix_cache.count_query(seq)
                if point is not None:
                    self.prefix_cache.resume(seq, point)
            self.block_manager.allocate(seq, need)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new, 0))
            budget -= num_new
            prefill_budget -= num_new
        return out

    def _fail(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.block_manager.free(seq)
        self.state_cache.free(seq)
        seq.finish("error", None)
        out.failed.append(seq)

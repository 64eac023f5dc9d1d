"""Constrained decoding in the engine: each constrained sequence's grammar state, and its token masks.

A sequence with `params.structured` gets a `GrammarState`: a matcher (nemoh/engine/grammar_compiler.py) that
follows the output once the think block has ended. Before that the reasoning is free, except that it may not end
the reply (EOS is masked): a constrained reply must reach its constraint. After each step the engine feeds every
appended token to `accept`; when the grammar is complete the sequence finishes ("stop").

Masks are bitmasks, 32 tokens per int32 word, as llguidance writes them: `GrammarMasks.fill` computes those of a
step's plain rows in one call over all their matchers (llguidance's thread pool), `GrammarState.draft_masks` those
of a speculative row: the state after each draft, reached by consuming the drafts and rolled back after, so that
the drafts are verified against the grammar and a rejected draft leaves no trace. `apply_token_bitmask_` masks a
logits batch in one op, after a single host-to-device copy of the bitmask.

A step's masks depend only on the tokens already appended (and the drafts being verified), so `GrammarMasks.start`
computes them on a worker thread while the model runs the step: llguidance releases the GIL, as does the
captured step's native call, so the mask time hides behind the forward when a core is free. The engine collects
them (`PendingMasks.result`) before it samples, and nothing else touches a matcher in between. Masks that cost
less than a thread hand-off (a few rows of a small vocabulary) are computed at collection instead.
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import llguidance
import torch

logger = logging.getLogger(__name__)
AHEAD_MIN_S = 0.5e-3
_BITS = torch.arange(32, dtype=torch.int32)


@dataclass
class TokenMasks:
    """Bitmasks of some rows of a logits batch: bitmask[j] belongs to logits row rows[j]."""
    bitmask: torch.Tensor     # (m, ceil(vocab / 32)) int32, on the CPU
    rows: list[int]


def num_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allowed_tokens(bitmask_row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(words,) int32 -> (vocab,) bool."""
    return ((bitmask_row[:, None] >> _BITS) & 1).bool().flatten()[:vocab_size]


def pack_bits(allowed: torch.Tensor) -> torch.Tensor:
    """(vocab,) bool -> (words,) int32 bitmask (the inverse of `allowed_tokens`)."""
    words = num_words(allowed.shape[0])
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[: allowed.shape[0]] = allowed.long()
    packed = (bits.view(words, 32) << _BITS.long()).sum(1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _fill_one(matcher, row: torch.Tensor) -> None:
    """The matcher's allowed tokens into one contiguous int32 CPU bitmask row (llguidance.torch's helper does the
    same, but importing it imports triton, which breaks the Triton interpreter tests that run later)."""
    assert row.dtype == torch.int32 and row.is_cpu and row.is_contiguous()
    matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())


def _fill_many(executor, matchers, bitmask: torch.Tensor) -> None:
    """Rows of a (batch, words) int32 CPU bitmask for (matcher, row) pairs, in parallel (llguidance's executor)."""
    assert bitmask.dtype == torch.int32 and bitmask.is_cpu and bitmask.is_contiguous()
    executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])


def apply_token_bitmask_(logits: torch.Tensor, masks: TokenMasks) -> torch.Tensor:
    """Set the disallowed tokens of the masked rows of logits (n, vocab) to -inf, in place; returns logits."""
    if not masks.rows:
        return logits
    vocab = logits.shape[1]
    bits = masks.bitmask.to(logits.device, non_blocking=True)
    allowed = ((bits[:, :, None] >> _BITS.to(logits.device)) & 1).bool().flatten(1)[:, :vocab]
    if len(masks.rows) == logits.shape[0] and masks.rows == list(range(len(masks.rows))):
        return logits.masked_fill_(~allowed, float("-inf"))
    index = torch.tensor(masks.rows, dtype=torch.long, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits


class GrammarState:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, start_after: tuple[int, ...], free_mask: torch.Tensor) -> None:
        self.matcher = matcher
        self.start_after = tuple(start_after)
        self.active = not start_after          # False while the think block lasts
        self._tail: tuple[int, ...] = ()       # the last output tokens, to see start_after go by
        self._free_mask = free_mask            # everything but EOS: the mask of the think block

    def accept(self, token: int) -> bool:
        """Advance by one generated token; False when the grammar does not allow it (the matcher is then broken)."""
        if not self.active:
            self._see(token)
            return True
        return self.matcher.consume_token(token)

    def _see(self, token: int) -> None:
        self._tail = (self._tail + (token,))[-len(self.start_after):]
        self.active = self._tail == self.start_after

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and allows nothing more (only EOS, already consumed or not needed)."""
        return self.active and self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None

    def fill(self, bitmask_row: torch.Tensor) -> None:
        """The mask of the next token into bitmask_row (words,)."""
        if self.active:
            _fill_one(self.matcher, bitmask_row)
        else:
            bitmask_row.copy_(self._free_mask)

    def draft_masks(self, drafts: list[int], bitmask: torch.Tensor) -> None:
        """The masks of a verification row into bitmask (len(drafts) + 1, words): row j is the mask after drafts[:j].

        The drafts are consumed to reach each state and rolled back after. Rows after the first draft the grammar
        refuses allow every token: verification stops at that draft, so they are never sampled from.
        """
        active, tail, consumed = self.active, self._tail, 0
        try:
            for j in range(len(drafts) + 1):
                self.fill(bitmask[j])
                if j == len(drafts):
                    break
                token = drafts[j]
                if self.active:
                    if not _allows(bitmask[j], token) or not self.matcher.consume_token(token):
                        bitmask[j + 1:].fill_(-1)
                        break
                    consumed += 1
                else:
                    self._see(token)
        finally:
            if consumed:
                self.matcher.rollback(consumed)
            self.active, self._tail = active, tail


def _allows(bitmask_row: torch.Tensor, token: int) -> bool:
    return token < 32 * bitmask_row.shape[0] and bool((int(bitmask_row[token // 32]) >> (token % 32)) & 1)


class GrammarMasks:
    """Masks of many sequences at once, for one vocabulary."""

    def __init__(self, vocab_size: int, eos_token_ids: list[int], num_threads: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.words = num_words(vocab_size)
        free = torch.ones(vocab_size, dtype=torch.bool)
        free[[t for t in eos_token_ids if t < vocab_size]] = False
        self.free_mask = pack_bits(free)
        self._executor = llguidance.LLExecutor(num_threads)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nemoh-masks")
        self.mask_time_s = 0.0           # a moving average of the time of one step's masks

    def new_state(self, matcher: llguidance.LLMatcher, start_after: tuple[int, ...]) -> GrammarState:
        return GrammarState(matcher, start_after, self.free_mask)

    def fill(self, states: list[GrammarState]) -> torch.Tensor:
        """The next-token masks of the states, (len(states), words): the active ones in one parallel call (one
        alone on this thread: handing it to the executor's pool costs a thread wake-up)."""
        bitmask = torch.empty((len(states), self.words), dtype=torch.int32)
        active = [(s.matcher, i) for i, s in enumerate(states) if s.active]
        for i, s in enumerate(states):
            if not s.active:
                bitmask[i].copy_(self.free_mask)
        if len(active) == 1:
            _fill_one(active[0][0], bitmask[active[0][1]])
        elif active:
            _fill_many(self._executor, active, bitmask)
        return bitmask

    def draft_masks(self, state: GrammarState, drafts: list[int]) -> torch.Tensor:
        bitmask = torch.empty((len(drafts) + 1, self.words), dtype=torch.int32)
        state.draft_masks(drafts, bitmask)
        return bitmask

    def start(self, jobs: list[tuple[int, GrammarState, list[int]]]) -> "PendingMasks":
        """Start computing the masks of (key, state, drafts) jobs: a plain row's (no drafts) next-token mask, all of
        them in one parallel call, or a verification row's `draft_masks`. On the worker thread when the masks of
        recent steps took at least AHEAD_MIN_S (a thread hand-off costs a wake-up, which on a loaded machine is more
        than a few cheap masks), else when collected. The states must not be touched until then."""
        if not jobs:
            return PendingMasks(None)
        if self.mask_time_s < AHEAD_MIN_S:
            return PendingMasks(None, lambda: self._compute(jobs))
        return PendingMasks(self._worker.submit(self._compute, jobs))

    def _compute(self, jobs: list[tuple[int, GrammarState, list[int]]]) -> dict[int, torch.Tensor]:
        start = time.perf_counter()
        out = self._compute_masks(jobs)
        self.mask_time_s += 0.2 * (time.perf_counter() - start - self.mask_time_s)    # a moving average
        return out

    def _compute_masks(self, jobs: list[tuple[int, GrammarState, list[int]]]) -> dict[int, torch.Tensor]:
        plain = [(key, state) for key, state, drafts in jobs if not drafts]
        out: dict[int, torch.Tensor] = {}
        if plain:
            bitmask = self.fill([state for _, state in plain])
            out.update((key, bitmask[i:i + 1]) for i, (key, _) in enumerate(plain))
        for key, state, drafts in jobs:
            if drafts:
                out[key] = self.draft_masks(state, drafts)
        return out


class PendingMasks:
    """Masks being computed on the worker thread (`future`), or to compute when collected (`compute`):
    {key: (rows, words) bitmask} once collected."""

    def __init__(self, future: concurrent.futures.Future | None,
                 compute: Callable[[], dict[int, torch.Tensor]] | None = None) -> None:
        self._future = future
        self._compute = compute

    def result(self) -> dict[int, torch.Tensor]:
        """Wait for the masks; {} when their computation failed (logged: the engine then computes each one itself,
        where the failure stays with its request)."""
        if self._future is None and self._compute is None:
            return {}
        try:
            return self._future.result() if self._future is not None else self._compute()
        except Exception:
            logger.exception("computing the step's grammar masks ahead failed; computing them one by one")
            return {}

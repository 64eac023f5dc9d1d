"""Prefix caching for the hybrid model: resume a new prompt from the longest prefix already computed.

An attention layer can reuse any prefix of KV blocks, but a Mamba layer carries one recurrent state that only
describes the sequence up to one exact position. So what is cached is a *resume point*: the KV blocks of
positions 0 .. P-1 (shared, reference-counted in `BlockManager`) together with a copy of the Mamba states
(SSM + conv, every layer) after exactly P tokens, kept in one of the state pool's snapshot slots. A new
sequence whose tokens start with the same P tokens takes the blocks, copies the state into its own slot and
computes from token P on: the result is what a prefill of all its tokens would give.

Resume points are saved (`save`) where a later request is likely to continue:
  1. one token before the end of every prompt, and at the end of every finished request (prompt + output
     less its last token, which is not computed yet). The next turn of an agent conversation re-sends all of
     it plus new messages, but Nemotron's template renders the previous turn's generation prompt
     (`<|im_start|>assistant\n<think>\n`) differently once it is history (`<think></think>\n...`, the
     reasoning dropped): the next prompt diverges at the previous prompt's last token, so the point one token
     before it is what hits. The same point serves a prompt sent again in full. Its cost: the prefill's
     last token is computed in a step of its own;
  2. where a new prompt stops matching what the KV cache holds (full blocks, by chained content hash): a
     shared system prompt with different users. The first request to diverge there pauses its prefill at
     that block boundary so that its state there is saved; the next ones resume there;
  3. a preempted sequence's computed tokens, so that it resumes instead of recomputing.
Prefill chunks end at these points (`Sequence.pause_at`) so that the state slot holds the state there.

Lookup (`lookup`) takes the longest resume point that is a prefix of the new tokens, leaving at least one
token to compute (its logits give the first new token).

Copy-on-write: a resumed sequence goes on writing in the block holding position P-1 when P is not a multiple
of the block size (positions P ... of that block), and with MTP always (the MTP layer's KV at position P-1
is made from token P, which differs between requests): that one block is copied, the others are shared and
never written. With MTP the point also keeps the main model's hidden state at position P-1, so that the
resumed sequence's MTP pass redoes position P-1 with its own next token (`Sequence.resume_hidden`).

Memory: blocks held only by resume points count as free for the scheduler; when an allocation needs them,
resume points are evicted, least recently used first (`reclaim`). Snapshot slots are a budget of their own;
a new point when all are taken evicts the least recently used one. So the cache never makes a request wait
or fail, and under pressure it only loses hits. A finished request's end-of-output point enters as the first
to be evicted: it only hits when the next prompt repeats the reply verbatim (not with reasoning dropped), and
the point one token before the prompt's end serves the next turn either way, so under pressure the cache
keeps one point per conversation instead of two.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from nemoh.engine.kv_cache import BlockManager, blocks_for
from nemoh.engine.sequence import Sequence
from nemoh.engine.state_cache import StateCache


def chain_hash(previous: bytes, tokens: list[int]) -> bytes:
    """The hash of a block of tokens following the blocks whose chained hash is `previous`."""
    return hashlib.blake2b(previous + array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass
class ResumePoint:
    num_tokens: int                   # P: the prefix it resumes (tokens 0 .. P-1 computed)
    key: bytes                        # chained hash of its P // block_size full blocks (b"" for none)
    tail: tuple[int, ...]             # its tokens after the full blocks (fewer than block_size)
    blocks: list[int]                 # the KV blocks of positions 0 .. P-1
    state_slot: int                   # snapshot slot holding the Mamba states after P tokens
    hidden: torch.Tensor | None       # MTP only: (1, hidden) main-model hidden at position P-1


@dataclass
class PrefixCacheCounters:
    """Prompt tokens looked up and found, per cache. KV: tokens of full prompt blocks found by content hash
    (reusable or not); Mamba: tokens actually resumed (KV and state of the same prefix), i.e. not computed."""
    kv_queries: int = 0
    kv_hits: int = 0
    mamba_queries: int = 0
    mamba_hits: int = 0
    num_resumed_tokens: int = 0       # every resume, a preempted sequence resuming its own work included
    num_saved: int = 0
    num_evicted: int = 0


class PrefixCache:
    def __init__(self, block_manager: BlockManager, state_cache: StateCache,
                 copy_state: Callable[[int, int], None], copy_block: Callable[[int, int], None],
                 keeps_hidden: bool = False):
        """copy_state(src_slot, dst_slot) / copy_block(src, dst) copy the cache tensors (the model runner's);
        keeps_hidden: MTP is on (points keep the hidden state, the block of position P-1 is always copied)."""
        self.block_manager = block_manager
        self.state_cache = state_cache
        self.block_size = block_manager.block_size
        self.copy_state = copy_state
        self.copy_block = copy_block
        self.keeps_hidden = keeps_hidden
        self._lru: OrderedDict[tuple[bytes, tuple[int, ...]], ResumePoint] = OrderedDict()
        self._by_key: dict[bytes, dict[tuple[int, ...], ResumePoint]] = {}
        self.counters = PrefixCacheCounters()
        block_manager.reclaim = self.reclaim

    @property
    def num_points(self) -> int:
        return len(self._lru)

    # ---- hashes -------------------------------------------------------------------------------------------
    def block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chained hashes of `seq`'s first `num_blocks` full blocks (computed once per sequence)."""
        bs, hashes = self.block_size, seq.block_hashes
        while len(hashes) < num_blocks:
            j = len(hashes)
            hashes.append(chain_hash(hashes[-1] if hashes else b"", seq.token_ids[j * bs:(j + 1) * bs]))
        return hashes[:num_blocks]

    def register(self, seq: Sequence) -> None:
        """Register the full blocks `seq` has computed under their hashes (after every step)."""
        n = seq.num_computed_tokens // self.block_size
        if n > seq.num_hashed_blocks:
            self.block_manager.register(seq, self.block_hashes(seq, n), n)

    # ---- lookup and resume --------------------------------------------------------------------------------
    def lookup(self, seq: Sequence) -> ResumePoint | None:
        """The longest resume point that is a prefix of `seq`'s tokens and leaves at least one token to
        compute. Also sets `seq.pause_at`: where its prefill pauses to save new points (rules 1 and 2)."""
        bs, n_tokens = self.block_size, seq.num_tokens
        hashes = self.block_hashes(seq, n_tokens // bs)
        best, shared = None, 0                 # shared: longest prefix known to be computed somewhere
        for n in range(len(hashes), -1, -1):
            for tail, point in self._by_key.get(hashes[n - 1] if n else b"", {}).items():
                p = point.num_tokens
                if tuple(seq.token_ids[n * bs:p]) != tail:
                    continue
                shared = max(shared, p)
                if p < n_tokens and (best is None or p > best.num_tokens):
                    best = point
            if best is not None:
                break
        shared = max(shared, self.block_manager.num_cached_prefix_blocks(hashes) * bs)
        resumed = best.num_tokens if best is not None else 0
        pause = {min(shared, n_tokens - 1)}
        if seq.num_preemptions == 0:
            pause.add(seq.num_prompt_tokens - 1)
        seq.pause_at = sorted(p for p in pause if p > resumed)
        return best

    def blocks_to_share(self, point: ResumePoint) -> tuple[list[int], int]:
        """(the point's blocks a resumed sequence takes, the number of them it copies)."""
        return point.blocks, int(self._copies_last_block(point.num_tokens))

    def _copies_last_block(self, num_tokens: int) -> bool:
        return self.keeps_hidden or num_tokens % self.block_size != 0

    def resume(self, seq: Sequence, point: ResumePoint) -> None:
        """Start `seq` (with its state slot, no blocks yet) from `point`: share its blocks, copy its state."""
        p = point.num_tokens
        self._lru.move_to_end((point.key, point.tail))
        self.block_manager.share(seq, point.blocks)
        self.copy_state(point.state_slot, seq.state_slot)    # before any eviction can reuse the snapshot slot
        if self._copies_last_block(p):
            src, dst = self.block_manager.copy_on_write(seq, len(seq.block_table) - 1)
            self.copy_block(src, dst)
        seq.num_hashed_blocks = min(seq.num_hashed_blocks, p // self.block_size)
        seq.num_computed_tokens = p
        seq.resume_hidden = point.hidden
        self.counters.num_resumed_tokens += p
        if seq.num_preemptions == 0:            # a preempted sequence resuming its own work is no hit
            seq.num_cached_tokens = min(p, seq.num_prompt_tokens)
            self.counters.mamba_hits += seq.num_cached_tokens

    def count_query(self, seq: Sequence) -> None:
        """Count an admitted prompt's lookup (hits are counted when it resumes)."""
        if seq.num_preemptions:
            return
        n = seq.num_prompt_tokens
        self.counters.kv_queries += n
        self.counters.mamba_queries += n
        hashes = self.block_hashes(seq, n // self.block_size)
        self.counters.kv_hits += self.block_manager.num_cached_prefix_blocks(hashes) * self.block_size

    # ---- saving and eviction ------------------------------------------------------------------------------
    def save(self, seq: Sequence, hidden: torch.Tensor | None = None, evict_first: bool = False) -> bool:
        """Keep `seq`'s state after its `num_computed_tokens` tokens as a resume point (the state slot must
        hold exactly that state, and its blocks those tokens' KV). evict_first: it enters as the least recently
        used point. Returns whether a point exists now."""
        p, bs = seq.num_computed_tokens, self.block_size
        if p == 0 or seq.state_slot is None or (self.keeps_hidden and hidden is None):
            return False
        key = self.block_hashes(seq, p // bs)[-1] if p >= bs else b""
        tail = tuple(seq.token_ids[p // bs * bs:p])
        if (key, tail) in self._lru:
            self._lru.move_to_end((key, tail))
            return True
        slot = self.state_cache.allocate_snapshot()
        while slot is None and self._lru:
            self.evict(next(iter(self._lru.values())))
            slot = self.state_cache.allocate_snapshot()
        if slot is None:                      # no snapshot slots at all
            return False
        self.copy_state(seq.state_slot, slot)
        blocks = seq.block_table[:blocks_for(p, bs)]
        self.block_manager.hold(blocks)
        point = ResumePoint(p, key, tail, blocks, slot, hidden)
        self._lru[(key, tail)] = point
        if evict_first:
            self._lru.move_to_end((key, tail), last=False)
        self._by_key.setdefault(key, {})[tail] = point
        self.counters.num_saved += 1
        return True

    def evict(self, point: ResumePoint) -> None:
        del self._lru[(point.key, point.tail)]
        group = self._by_key[point.key]
        del group[point.tail]
        if not group:
            del self._by_key[point.key]
        self.block_manager.release(point.blocks)
        self.state_cache.free_snapshot(point.state_slot)
        self.counters.num_evicted += 1

    def reclaim(self, num_blocks: int) -> None:
        """Evict resume points, least recently used first, until `num_blocks` blocks are free (or none is left)."""
        while self.block_manager.num_free_blocks < num_blocks and self._lru:
            self.evict(next(iter(self._lru.values())))

    def reset(self) -> None:
        """Drop every resume point and every block hash (the cache starts cold again)."""
        while self._lru:
            self.evict(next(iter(self._lru.values())))
        self.block_manager.forget_hashes()

    def stats(self) -> dict:
        c = self.counters
        return {
            "prefix_cache_queries_total": c.kv_queries,
            "prefix_cache_hits_total": c.kv_hits,
            "mamba_prefix_cache_queries_total": c.mamba_queries,
            "mamba_prefix_cache_hits_total": c.mamba_hits,
            "prefix_cache_resume_points": self.num_points,
            "prefix_cache_blocks": self.block_manager.num_cached_blocks,
            "prefix_cache_state_slots_used": self.state_cache.num_used_snapshot_slots,
            "prefix_cache_state_slots_total": self.state_cache.num_snapshot_slots,
            "prefix_cache_evictions_total": c.num_evicted,
        }

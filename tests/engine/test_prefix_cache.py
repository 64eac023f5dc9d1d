"""PrefixCache bookkeeping without a model: resume points, lookup, pause points, copy-on-write, LRU eviction,
and the block counters that make leaks visible."""
import pytest

from nemoh.engine.kv_cache import BlockManager
from nemoh.engine.prefix_cache import PrefixCache, chain_hash
from nemoh.engine.scheduler import Scheduler
from nemoh.engine.sequence import Sequence
from nemoh.engine.state_cache import StateCache
from nemoh.sampling_params import SamplingParams

BS = 4


def seq(tokens, rid="r"):
    return Sequence(rid, 0, list(tokens), SamplingParams(), max_tokens=100, arrival_time=0.0)


class Copies:
    """Records the tensor copies the cache asks for."""

    def __init__(self):
        self.states, self.blocks = [], []

    def state(self, src, dst):
        self.states.append((src, dst))

    def block(self, src, dst):
        self.blocks.append((src, dst))


def make(num_blocks=16, slots=4, snapshots=4, keeps_hidden=False):
    bm = BlockManager(num_blocks, BS)
    sc = StateCache(slots, snapshots)
    copies = Copies()
    return PrefixCache(bm, sc, copies.state, copies.block, keeps_hidden), bm, sc, copies


def computed(cache, s, n):
    """`s` holds a state slot and blocks, and has computed its first n tokens."""
    cache.state_cache.allocate(s)
    cache.block_manager.allocate(s, n)
    s.num_computed_tokens = n
    cache.register(s)


def finish(cache, s):
    cache.block_manager.free(s)
    cache.state_cache.free(s)


def assert_counts(bm):
    assert bm.num_used_blocks + bm.num_cached_blocks + bm.num_free_blocks == bm.num_blocks


def test_chain_hash_depends_on_everything_before():
    a = chain_hash(b"", [1, 2, 3, 4])
    assert a == chain_hash(b"", [1, 2, 3, 4]) and a != chain_hash(b"", [1, 2, 3, 5])
    assert chain_hash(a, [5, 6, 7, 8]) != chain_hash(chain_hash(b"", [0, 2, 3, 4]), [5, 6, 7, 8])


def test_save_then_resume_mid_block_copies_the_last_block():
    cache, bm, sc, copies = make()
    a = seq(range(10))
    computed(cache, a, 10)
    assert cache.save(a)
    finish(cache, a)
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 3 and sc.num_used_snapshot_slots == 1
    b = seq(list(range(10)) + [50, 51])
    point = cache.lookup(b)
    assert point.num_tokens == 10 and b.pause_at == [11]     # one before its end
    sc.allocate(b)
    cache.resume(b, point)
    assert b.num_computed_tokens == 10
    assert copies.states[-1] == (point.state_slot, b.state_slot)
    # blocks 0-1 shared, block 2 (positions 8-9, written on from 10) copied into a block of b's own
    assert b.block_table[:2] == point.blocks[:2] and b.block_table[2] != point.blocks[2]
    assert copies.blocks == [(point.blocks[2], b.block_table[2])]
    assert_counts(bm)


def test_block_aligned_point_shares_every_block_without_mtp_and_copies_the_last_with_mtp():
    for keeps_hidden, num_copies in ((False, 0), (True, 1)):
        cache, bm, sc, copies = make(keeps_hidden=keeps_hidden)
        a = seq(range(8))
        computed(cache, a, 8)
        assert cache.save(a, hidden="h" if keeps_hidden else None)
        b = seq(list(range(8)) + [9])
        point = cache.lookup(b)
        assert cache.blocks_to_share(point) == (point.blocks, num_copies)
        sc.allocate(b)
        cache.resume(b, point)
        assert len(copies.blocks) == num_copies
        assert b.resume_hidden == ("h" if keeps_hidden else None)


def test_lookup_takes_the_longest_prefix_and_leaves_one_token_to_compute():
    cache, bm, sc, _ = make()
    a = seq(range(12))
    computed(cache, a, 4)
    for n in (4, 6, 12):            # points at 4, 6 (mid-block) and 12 (block-aligned)
        bm.allocate(a, n)
        a.num_computed_tokens = n
        cache.register(a)
        cache.save(a)
    assert cache.num_points == 3
    assert cache.lookup(seq(list(range(12)) + [1])).num_tokens == 12
    assert cache.lookup(seq(list(range(7)) + [99] * 5)).num_tokens == 6
    assert cache.lookup(seq(list(range(5)) + [99] * 5)).num_tokens == 4
    assert cache.lookup(seq([99] + list(range(1, 12)))) is None
    # the same 12 tokens again (an exact multiple of the block size): resume at 6, pause at 11 so that the
    # next identical prompt finds a point before its last token
    again = seq(range(12))
    assert cache.lookup(again).num_tokens == 6 and again.pause_at == [11]


def test_shared_prefix_without_a_state_asks_for_a_pause_at_the_last_shared_block():
    cache, bm, sc, _ = make()
    system = list(range(100, 110))                   # 10 tokens: 2 full blocks + 2
    a = seq(system + [1, 2, 3])
    computed(cache, a, 13)                          # no point saved inside the system prompt
    b = seq(system + [7, 8, 9, 10])
    assert cache.lookup(b) is None and b.pause_at == [8, 13]
    c = seq([5] + system)
    assert cache.lookup(c) is None and c.pause_at == [10]


def test_snapshot_slots_are_evicted_least_recently_used_first():
    cache, bm, sc, _ = make(snapshots=2)
    seqs = [seq([i] * 5, f"r{i}") for i in range(3)]
    for s in seqs[:2]:
        computed(cache, s, 5)
        cache.save(s)
        finish(cache, s)
    cache.lookup(seq([0] * 6))                       # a lookup alone does not touch
    user = seq([0] * 6)
    sc.allocate(user)
    cache.resume(user, cache.lookup(user))            # resuming makes r0's point the most recent
    computed(cache, seqs[2], 5)
    cache.save(seqs[2])
    assert cache.counters.num_evicted == 1
    assert cache.lookup(seq([1] * 6)) is None        # r1's point went
    assert cache.lookup(seq([0] * 6)).num_tokens == 5 and cache.lookup(seq([2] * 6)).num_tokens == 5
    assert sc.num_used_snapshot_slots == 2


def test_allocation_reclaims_cached_blocks_so_the_cache_never_blocks_a_request():
    cache, bm, sc, _ = make(num_blocks=6)
    a = seq(range(16))
    computed(cache, a, 16)                          # 4 blocks
    cache.save(a)
    finish(cache, a)
    assert bm.num_free_blocks == 2 and bm.num_cached_blocks == 4
    b = seq(range(200, 224))                         # 6 blocks, shares nothing
    assert bm.can_allocate(b, 24)
    bm.allocate(b, 24)
    assert cache.num_points == 0 and sc.num_used_snapshot_slots == 0 and bm.num_used_blocks == 6
    assert_counts(bm)


def test_a_shared_block_is_freed_only_when_neither_a_sequence_nor_a_point_holds_it():
    cache, bm, sc, _ = make(num_blocks=8)
    a = seq(range(8))
    computed(cache, a, 8)
    cache.save(a)
    b = seq(list(range(8)) + [1, 2])
    sc.allocate(b)
    cache.resume(b, cache.lookup(b))
    bm.allocate(b, 10)
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared
    finish(cache, a)
    cache.evict(next(iter(cache._lru.values())))
    assert bm.num_used_blocks == 3 and bm.num_cached_blocks == 0          # b still holds the shared two
    finish(cache, b)
    assert bm.num_free_blocks == 8
    assert_counts(bm)


def test_scheduler_resumes_a_waiting_sequence_and_ends_its_chunks_at_pause_points():
    cache, bm, sc, _ = make(num_blocks=32, slots=4)
    sched = Scheduler(bm, sc, max_num_seqs=4, max_num_batched_tokens=64, prefix_cache=cache)
    a = seq(range(10), "a")
    sched.add(a)
    out = sched.schedule()
    assert out.scheduled[0].num_new_tokens == 9             # paused one token before the prompt's end
    a.num_computed_tokens = 10
    cache.register(a)
    cache.save(a)
    b = seq(list(range(10)) + [40, 41, 42], "b")
    sched.add(b)
    out = sched.schedule()
    got = {s.seq.request_id: s.num_new_tokens for s in out.scheduled}
    assert got["b"] == 2 and b.num_computed_tokens == 10 and b.num_cached_tokens == 10
    c = seq(list(range(8)) + [77] * 6, "c")          # shares a's first two blocks, no point there
    sched.add(c)
    out = sched.schedule()
    assert {s.seq.request_id: s.num_new_tokens for s in out.scheduled}["c"] == 8 and c.pause_at == [8, 13]
    stats = cache.stats()
    assert stats["prefix_cache_queries_total"] == 10 + 13 + 14
    assert stats["mamba_prefix_cache_hits_total"] == 10
    assert stats["prefix_cache_hits_total"] == 8 + 8     # b: 2 full blocks of 3; c: 2


def test_prefix_cache_state_slots_are_validated():
    from nemoh.engine.config import EngineArgs

    with pytest.raises(ValueError, match="prefix_cache_state_slots"):
        EngineArgs(prefix_cache_state_slots=-1)
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineArgs(enable_prefix_caching="yes")
    assert EngineArgs().enable_prefix_caching is True


def test_a_point_saved_to_be_evicted_first_goes_before_older_ones():
    cache, bm, sc, _ = make(snapshots=2)
    a, b, c = seq([1] * 5, "a"), seq([2] * 5, "b"), seq([3] * 5, "c")
    computed(cache, a, 5)
    cache.save(a)
    computed(cache, b, 5)
    cache.save(b, evict_first=True)              # a finished request's end, say
    computed(cache, c, 5)
    cache.save(c)
    assert cache.lookup(seq([2] * 6)) is None
    assert cache.lookup(seq([1] * 6)).num_tokens == 5 and cache.lookup(seq([3] * 6)).num_tokens == 5

"""BlockManager and StateCache bookkeeping: the shared verbs and leak-revealing counters."""
import pytest
import torch

from nemoh.engine.kv_cache import BlockManager, allocate_kv_caches, blocks_for, kv_bytes_per_block
from nemoh.engine.sequence import Sequence
from nemoh.engine.state_cache import StateCache, allocate_mamba_caches, state_bytes_per_slot
from nemoh.sampling_params import SamplingParams


def make_seq(n_tokens=5):
    return Sequence("r", 0, list(range(n_tokens)), SamplingParams(), max_tokens=8, arrival_time=0.0)


def test_block_manager_allocate_append_free():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = make_seq(), make_seq()
    assert bm.can_allocate(a, 5)
    bm.allocate(a, 5)
    assert len(a.block_table) == 2 and bm.num_used_blocks == 2 and bm.num_free_blocks == 2
    bm.append(a, 8)                      # still two blocks
    assert len(a.block_table) == 2
    bm.append(a, 9)
    assert len(a.block_table) == 3
    assert not bm.can_allocate(b, 5)
    with pytest.raises(RuntimeError):
        bm.allocate(b, 5)
    assert b.block_table == []           # a failed allocation takes nothing
    bm.free(a)
    assert bm.num_used_blocks == 0 and a.block_table == []
    bm.allocate(b, 16)
    assert sorted(b.block_table) == [0, 1, 2, 3]
    assert bm.slot(b, 5) == b.block_table[1] * 4 + 1


def test_state_cache_slots():
    sc = StateCache(num_slots=2)
    a, b, c = make_seq(), make_seq(), make_seq()
    sc.allocate(a)
    sc.allocate(a)                       # idempotent
    sc.allocate(b)
    assert sc.num_used_slots == 2 and not sc.can_allocate(c) and sc.can_allocate(a)
    with pytest.raises(RuntimeError):
        sc.allocate(c)
    sc.free(a)
    sc.free(a)                           # freeing twice gives back one slot only
    assert sc.num_free_slots == 1
    sc.allocate(c)
    assert c.state_slot is not None and c.state_slot != b.state_slot


def test_state_cache_hands_out_the_lowest_free_slot():
    """Slots stay packed at the low end, so that a decode batch's states are one window of the cache."""
    sc = StateCache(num_slots=6)
    seqs = [make_seq() for _ in range(5)]
    for s in seqs:
        sc.allocate(s)
    assert [s.state_slot for s in seqs] == [0, 1, 2, 3, 4]
    sc.free(seqs[3])
    sc.free(seqs[1])
    late = make_seq()
    sc.allocate(late)
    assert late.state_slot == 1


def test_cache_tensors_and_sizes():
    kv = allocate_kv_caches([1, 5], num_blocks=3, block_size=4, num_kv_heads=2, head_dim=8,
                            dtype=torch.float16, device="cpu")
    assert set(kv) == {1, 5} and kv[1][0].shape == (3, 4, 2, 8)
    assert kv_bytes_per_block(2, 4, 2, 8, torch.float16) == 2 * 2 * 4 * 2 * 8 * 2
    m = allocate_mamba_caches([0], num_slots=2, conv_dim=6, conv_kernel=4, num_heads=2, head_dim=3,
                              state_size=5, conv_dtype=torch.float32, ssm_dtype=torch.bfloat16, device="cpu")
    conv, ssm = m[0]
    assert conv.shape == (2, 6, 3) and ssm.shape == (2, 2, 3, 5) and ssm.dtype == torch.bfloat16
    assert state_bytes_per_slot(1, 6, 4, 2, 3, 5, torch.float32, torch.bfloat16) == 6 * 3 * 4 + 2 * 3 * 5 * 2
    assert blocks_for(0, 4) == 0 and blocks_for(4, 4) == 1 and blocks_for(5, 4) == 2

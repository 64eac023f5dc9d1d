"""Scheduler: mixed batches, chunked prefill under a token budget, FCFS, preemption, impossible requests."""
from nemoh.engine.kv_cache import BlockManager
from nemoh.engine.scheduler import Scheduler
from nemoh.engine.sequence import Sequence, SequenceStatus
from nemoh.engine.state_cache import StateCache
from nemoh.sampling_params import SamplingParams


def seq(n, rid="r"):
    return Sequence(rid, 0, list(range(n)), SamplingParams(), max_tokens=100, arrival_time=0.0)


def run_step(sched, out):
    """Pretend the model ran: advance computed tokens; sequences that reached the end get a new token."""
    for s in out.scheduled:
        samples = s.samples
        s.seq.num_computed_tokens += s.num_new_tokens - s.num_draft_tokens
        if samples:
            s.seq.token_ids.append(7)


def make(num_blocks=100, slots=8, budget=16, max_seqs=8, chunked=True, lookahead=0):
    return Scheduler(BlockManager(num_blocks, 4), StateCache(slots), max_seqs, budget, chunked, lookahead)


def test_chunked_prefill_and_mixed_batch():
    sch = make(budget=8)
    a, b = seq(3, "a"), seq(20, "b")
    sch.add(a)
    sch.add(b)
    out = sch.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 3), ("b", 5)]
    assert out.scheduled[0].samples and not out.scheduled[1].samples
    run_step(sch, out)
    out = sch.schedule()            # a decodes (1 token) while b's prefill continues (7 tokens)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]
    run_step(sch, out)
    out = sch.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]
    run_step(sch, out)
    out = sch.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 1)]
    assert out.scheduled[1].samples


def test_no_chunking_waits_for_room():
    sch = make(budget=8, chunked=False)
    a, b = seq(3, "a"), seq(7, "b")
    sch.add(a)
    sch.add(b)
    out = sch.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["a"]        # b (7) does not fit in the 5 left
    run_step(sch, out)
    out = sch.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]


def test_max_num_seqs_and_slots():
    sch = make(slots=2, max_seqs=8)
    seqs = [seq(2, str(i)) for i in range(3)]
    for s in seqs:
        sch.add(s)
    out = sch.schedule()
    assert len(out.scheduled) == 2 and sch.num_waiting == 1
    sch2 = make(slots=8, max_seqs=1)
    for s in [seq(2, str(i)) for i in range(3)]:
        sch2.add(s)
    assert len(sch2.schedule().scheduled) == 1


def test_preemption_frees_and_requeues_latest_first():
    sch = make(num_blocks=4, budget=64)      # 16 tokens of KV in all
    a, b = seq(7, "a"), seq(8, "b")
    sch.add(a)
    sch.add(b)
    out = sch.schedule()
    assert len(out.scheduled) == 2 and sch.block_manager.num_free_blocks == 0
    run_step(sch, out)                       # a: 8 tokens (2 blocks, full), b: 9 tokens -> needs a third
    out = sch.schedule()
    # a needs a new block for its 9th token; b (the latest) is preempted
    assert out.preempted == [b] and b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_table == [] and b.state_slot is None and list(sch.waiting) == [b]
    assert [s.seq for s in out.scheduled] == [a]
    assert b.num_tokens == 9                 # generated token kept: it is recomputed with the prompt


def test_request_that_can_never_fit_fails():
    sch = make(num_blocks=2, budget=64)
    big = seq(9, "big")                      # 9 tokens > 8 tokens of KV
    ok = seq(3, "ok")
    sch.add(big)
    sch.add(ok)
    out = sch.schedule()
    assert out.failed == [big] and big.finish_reason == "error"
    assert [s.seq for s in out.scheduled] == [ok]
    # a running sequence that outgrows the whole cache alone fails too
    for _ in range(10):
        run_step(sch, out)
        out = sch.schedule()
        if out.failed:
            break
    assert out.failed == [ok] and sch.block_manager.num_used_blocks == 0 and sch.state_cache.num_used_slots == 0


def test_spec_drafts_and_lookahead():
    sch = make(budget=16, lookahead=2)
    a = seq(4, "a")
    sch.add(a)
    out = sch.schedule()
    assert len(a.block_table) == 2           # 4 prompt tokens + 2 lookahead
    run_step(sch, out)
    a.draft_token_ids = [1, 2]
    out = sch.schedule()
    s = out.scheduled[0]
    assert (s.num_new_tokens, s.num_draft_tokens) == (3, 2) and s.samples
    assert len(a.block_table) == 3           # 4 computed + 3 new + 2 lookahead = 9 tokens
    sch.finish(a)
    assert sch.block_manager.num_used_blocks == 0 and sch.state_cache.num_used_slots == 0


def test_prefill_cap_bounds_prompt_tokens_but_not_decodes():
    sch = make(budget=32)
    a = seq(3, "a")
    sch.add(a)
    run_step(sch, sch.schedule())                # a is decoding now
    b, c = seq(20, "b"), seq(20, "c")
    sch.add(b)
    sch.add(c)
    out = sch.schedule(max_prefill_tokens=8)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 8)]
    assert out.num_prefill_tokens == 8
    run_step(sch, out)
    out = sch.schedule(max_prefill_tokens=10)    # b's next chunk takes all of it: c waits
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 10)]
    assert sum(s.num_new_tokens for s in out.scheduled if s.seq is not a) == 10
    assert out.num_prefill_tokens == 10
    run_step(sch, out)
    out = sch.schedule()                         # no cap: b's last 2 tokens and all of c
    assert out.num_prefill_tokens == 22

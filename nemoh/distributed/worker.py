"""The driver and the workers of a tensor-parallel engine.

The driver (rank 0) runs the whole engine: scheduler, sampler, detokenizer, server. Its ModelRunner and MTP
proposer are wrapped (`DriverRunner`, `DriverProposer`) so that each call first broadcasts what the call needs
(token ids, positions, block tables, state slots) to the workers; every worker then makes the same call on its
own ModelRunner, over its own share of the weights and caches, and the collectives inside the model meet.
Results that later calls read (hidden states for the MTP drafter, per-position Mamba states for a roll-back)
stay on each rank, keyed by sequence id; only the driver samples.

    driver:  execute(batch) -> send("execute", inputs) -> model forward (all-reduce x layers, all-gather logits)
    worker:  receive() ------------------------------> model forward (the same collectives)
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
from dataclasses import replace

import torch

from nemoh.distributed.launch import (RankInfo, WorkerSet, check_devices, free_init_method, init_ranks, rank_device,
                                      spawn_workers, torchrun_rank)
from nemoh.distributed.layout import TP_FLAG, ParallelLayout
from nemoh.distributed.step_channel import StepChannel

logger = logging.getLogger(__name__)


# ---- the driver --------------------------------------------------------------------------------------------
class ParallelDriver:
    """Rank 0's handle on the workers: the step channel, their processes (spawned mode) and their health."""

    def __init__(self, channel: StepChannel, workers: WorkerSet | None, tp):
        self.channel, self.workers, self.tp = channel, workers, tp
        self.closed = False

    def alive(self) -> bool:
        return not self.closed and (self.workers is None or self.workers.alive())

    def send(self, message: tuple) -> None:
        if not self.alive():
            raise RuntimeError(self.workers.dead if self.workers is not None and self.workers.dead
                               else "the tensor-parallel workers are stopped")
        self.channel.send(message)

    def attach(self, engine) -> None:
        """Tell the workers the cache sizes the driver chose, then route the engine's runner calls through here."""
        runner = engine.runner
        self.send(("init", runner.num_kv_blocks, runner.num_state_slots, runner.num_snapshot_slots,
                   engine.max_model_len))
        engine.runner = DriverRunner(runner, self)
        if engine.prefix_cache is not None:         # its state and block copies happen on every rank
            engine.prefix_cache.copy_state = engine.runner.copy_state
            engine.prefix_cache.copy_block = engine.runner.copy_block
        if engine.proposer is not None:
            engine.proposer = DriverProposer(engine.proposer, self)

    def close(self) -> None:
        """End every worker (idempotent)."""
        if self.closed:
            return
        try:
            if self.alive():
                self.channel.send(("shutdown",))
        except Exception:           # a worker already gone: the processes are ended below
            logger.debug("shutdown message not delivered", exc_info=True)
        self.closed = True
        if self.workers is not None:
            self.workers.shutdown()
        import torch.distributed as dist

        if dist.is_initialized():       # another engine may start in this process later
            dist.destroy_process_group()


class DriverRunner:
    """The driver's ModelRunner: broadcasts each call's inputs, then runs it; everything else passes through."""

    def __init__(self, runner, driver: ParallelDriver):
        self._runner, self._driver = runner, driver

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def execute(self, scheduled):
        items = [(s.seq.seq_id, s.num_new_tokens, s.num_draft_tokens, s.seq.num_computed_tokens, s.seq.num_tokens,
                  self._runner.input_tokens(s), list(s.seq.block_table), s.seq.state_slot) for s in scheduled]
        self._driver.send(("execute", items))
        return self._runner.execute(scheduled)

    def rollback_mamba_state(self, seq, intermediate, position: int) -> None:
        self._driver.send(("rollback", seq.seq_id, seq.state_slot, position))
        self._runner.rollback_mamba_state(seq, intermediate, position)

    def copy_state(self, src: int, dst: int) -> None:
        self._driver.send(("copy_state", src, dst))
        self._runner.copy_state(src, dst)

    def copy_block(self, src: int, dst: int) -> None:
        self._driver.send(("copy_block", src, dst))
        self._runner.copy_block(src, dst)


class DriverProposer:
    def __init__(self, proposer, driver: ParallelDriver):
        self._proposer, self._driver = proposer, driver

    def __getattr__(self, name):
        return getattr(self._proposer, name)

    def propose(self, requests) -> None:
        # a sequence just resumed from the prefix cache redoes the resume point's last position first, with the
        # hidden state the point kept (the driver's alone): it travels with the message
        items = [(r.seq.seq_id, r.start, r.hidden.shape[0], r.needs_draft,
                  r.seq.token_ids[r.start + 1:r.start + 1 + r.hidden.shape[0]], list(r.seq.block_table),
                  r.seq.state_slot, r.resumed_hidden.cpu() if r.resumed_hidden is not None else None)
                 for r in requests]
        self._driver.send(("propose", items))
        self._proposer.propose(requests)


# ---- starting --------------------------------------------------------------------------------------------
def load_parallel(model_dir: str, args):
    """Rank 0: start (or join) the ranks and load this rank's share; returns (model, ParallelDriver).
    Under torchrun, ranks > 0 run the worker loop here and exit the process when the driver ends."""
    from nemoh.config import NemotronHConfig
    from nemoh.quant.modelopt import QuantConfig

    n = args.tensor_parallel_size
    config = NemotronHConfig.from_pretrained(model_dir)
    qcfg = QuantConfig.from_model_dir(model_dir)
    ParallelLayout(n, 0, args.enable_expert_parallel).check(config, qcfg.quant_algo if qcfg else None)
    info = torchrun_rank()
    processes = None
    if info is None:
        check_devices(n, args.device)
        info = RankInfo(0, n, 0, free_init_method())
        _cpu_threads(args.device, n)
        processes = spawn_workers(n, worker_main, (n, info.init_method, model_dir, args))
    else:
        if info.world_size != n:
            raise ValueError(f"{TP_FLAG} {n}: torchrun started {info.world_size} processes (WORLD_SIZE); "
                             "they must match")
        if info.rank > 0:
            run_worker(info, model_dir, args)
            sys.exit(0)
    workers = WorkerSet(processes) if processes else None
    try:
        model, tp, channel = _load_rank(info, model_dir, args, config)
    except BaseException:
        if workers is not None:
            workers.shutdown()
        raise
    driver = ParallelDriver(channel, workers, tp)
    atexit.register(driver.close)
    return model, driver


def _cpu_threads(device: str, world_size: int) -> None:
    """On a CPU the ranks share the cores: each gets its part (more threads than cores only adds contention)."""
    if torch.device(device).type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // world_size))


def _load_rank(info: RankInfo, model_dir: str, args, config):
    from nemoh.loader import load_model

    device = rank_device(args.device, info)
    tp, group = init_ranks(info, device, config.vocab_size)
    layout = ParallelLayout(info.world_size, info.rank, args.enable_expert_parallel)
    model = load_model(model_dir, dtype=args.dtype, device=device, layout=layout, tp=tp)
    logger.info("nemoh tensor parallel: rank %d of %d on %s%s", info.rank, info.world_size, device,
                ", expert parallel" if args.enable_expert_parallel else "")
    return model, tp, StepChannel(group)


# ---- the workers -------------------------------------------------------------------------------------------
def worker_main(rank: int, world_size: int, init_method: str, model_dir: str, args) -> None:
    """A spawned worker process (rank >= 1)."""
    logging.basicConfig(level=os.environ.get("NEMOH_WORKER_LOG_LEVEL", "WARNING"),
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    _cpu_threads(args.device, world_size)
    try:
        run_worker(RankInfo(rank, world_size, rank, init_method), model_dir, args)
    except BaseException:
        logger.exception("tensor-parallel worker rank %d failed", rank)
        os._exit(1)
    os._exit(0)


class _Window:
    """The token ids of a sequence that a worker was sent: positions [offset, offset + len(items))."""

    def __init__(self, offset: int, items: list[int]):
        self.offset, self.items = offset, items

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.items[key.start - self.offset:key.stop - self.offset]
        return self.items[key - self.offset] if key >= 0 else self.items[key]


class _SeqMirror:
    """What a worker's ModelRunner reads of a sequence (the driver's Sequence stays on the driver)."""

    def __init__(self, seq_id: int, block_table: list[int], state_slot: int | None, num_computed_tokens: int = 0,
                 num_tokens: int = 0, tokens: list[int] | None = None, token_ids: _Window | None = None):
        self.seq_id, self.block_table, self.state_slot = seq_id, block_table, state_slot
        self.num_computed_tokens, self.num_tokens, self.tokens = num_computed_tokens, num_tokens, tokens
        self.token_ids = token_ids
        self.draft_token_ids: list[int] = []


def run_worker(info: RankInfo, model_dir: str, args) -> None:
    """Load this rank's share, then make the driver's ModelRunner calls until it says shutdown."""
    from nemoh.config import NemotronHConfig
    from nemoh.engine.model_runner import ModelRunner
    from nemoh.engine.scheduler import ScheduledSeq
    from nemoh.engine.spec_decode import DraftRequest, MTPProposer

    config = NemotronHConfig.from_pretrained(model_dir)
    model, _, channel = _load_rank(info, model_dir, args, config)
    message = channel.receive()
    if message[0] != "init":
        return
    _, num_kv_blocks, num_state_slots, num_snapshot_slots, max_model_len = message
    runner = ModelRunner(model, replace(args, num_kv_blocks=num_kv_blocks, num_state_slots=num_state_slots,
                                        enable_prefix_caching=num_snapshot_slots > 0,
                                        prefix_cache_state_slots=num_snapshot_slots),
                         max_model_len)
    runner.input_tokens = lambda s: s.seq.tokens          # the driver sent each sequence's input tokens
    k = args.speculative_config.num_speculative_tokens if args.speculative_config else 0
    proposer = MTPProposer(model, runner, k) if k else None
    results: dict[int, object] = {}
    while True:
        message = channel.receive()
        kind = message[0]
        if kind == "execute":
            scheduled = [ScheduledSeq(_SeqMirror(sid, table, slot, computed, total, tokens), n, d)
                         for sid, n, d, computed, total, tokens, table, slot in message[1]]
            results = {r.scheduled.seq.seq_id: r for r in runner.execute(scheduled)}
        elif kind == "rollback":
            _, sid, slot, position = message
            runner.rollback_mamba_state(_SeqMirror(sid, [], slot), results[sid].intermediate, position)
        elif kind == "propose":
            proposer.propose([DraftRequest(_SeqMirror(sid, table, slot, token_ids=_Window(start + 1, window)), start,
                                           results[sid].hidden[:m] if lead is None else
                                           torch.cat([lead.to(results[sid].hidden), results[sid].hidden[:m - 1]]),
                                           needs_draft)
                              for sid, start, m, needs_draft, window, table, slot, lead in message[1]])
        elif kind == "copy_state":
            runner.copy_state(message[1], message[2])
        elif kind == "copy_block":
            runner.copy_block(message[1], message[2])
        elif kind == "shutdown":
            return
        else:
            raise RuntimeError(f"unknown step message {kind!r}")

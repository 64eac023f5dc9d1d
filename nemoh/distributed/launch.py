"""Starting the ranks of a tensor-parallel engine.

On one machine the driver (rank 0, the process the user started) spawns ranks 1..N-1 as worker processes
(`spawn_workers`), each on its own device (cuda:r, or the CPU), and watches them: a worker that dies makes
`WorkerSet.alive()` false, which the server's health check reads. Across machines the same program runs under
torchrun, one process per device; `torchrun_rank()` reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT from its environment, rank 0 drives and the others run the worker loop.

Process groups: the model's collectives on NCCL (GPUs) or gloo (CPU), plus a gloo group for the driver's
step messages (nemoh.distributed.step_channel), which waits for the next step as long as the server is idle.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from nemoh.distributed.collectives import TPGroup

logger = logging.getLogger(__name__)
COLLECTIVE_TIMEOUT = timedelta(minutes=10)        # a step's collectives: ranks arrive together or one is gone
IDLE_TIMEOUT = timedelta(days=365)                # the step channel: a server may idle for long


@dataclass
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    init_method: str


def torchrun_rank() -> RankInfo | None:
    """This process's place when started by torchrun (its environment variables), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    return RankInfo(rank, world, local, "env://")


def free_init_method() -> str:
    """A tcp:// rendezvous on a port the OS picks (no hard-coded port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def rank_device(device: str, info: RankInfo) -> str:
    """The device of a rank: cuda:<local rank> on GPUs (checked against the devices there are), else the CPU."""
    kind = torch.device(device).type
    if kind != "cuda":
        return "cpu"
    count = torch.cuda.device_count()
    if info.local_rank >= count:
        raise ValueError(f"--tensor-parallel-size {info.world_size}: rank {info.rank} needs cuda:{info.local_rank} "
                         f"but this machine has {count} GPU(s)")
    return f"cuda:{info.local_rank}"


def init_ranks(info: RankInfo, device: str, vocab_size: int) -> tuple[TPGroup, dist.ProcessGroup]:
    """Join the process group; returns the model's TPGroup and the gloo group of the step channel."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=info.init_method, rank=info.rank, world_size=info.world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    channel = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return TPGroup(None, vocab_size), channel


def check_devices(world_size: int, device: str) -> None:
    """Refuse, before any weight is read, more ranks than this machine's GPUs (torchrun: checked per rank)."""
    if world_size > 1 and torch.device(device).type == "cuda" and torchrun_rank() is None:
        count = torch.cuda.device_count()
        if world_size > count:
            raise ValueError(f"--tensor-parallel-size {world_size}: this machine has {count} GPU(s); use at most "
                             f"{count}, or torchrun across machines")


class WorkerSet:
    """The spawned worker processes of a driver: watched by a thread, ended together."""

    def __init__(self, processes: list, on_death=None):
        self.processes = processes
        self.dead: str | None = None
        self._on_death = on_death
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="nemoh-workers", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self.dead is None

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for rank, p in enumerate(self.processes, start=1):
                if p.exitcode is not None:
                    self.dead = f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
                    logger.error("%s; the engine stops", self.dead)
                    if self._on_death is not None:
                        self._on_death(self.dead)
                    return

    def shutdown(self, timeout: float = 5.0) -> None:
        """End every worker: SIGTERM, then SIGKILL what is left after `timeout` seconds."""
        self._stop.set()
        for p in self.processes:
            if p.exitcode is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join(1.0)


def spawn_workers(world_size: int, target, args: tuple) -> list:
    """Start ranks 1..world_size-1 running target(rank, *args) in fresh interpreters."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    processes = []
    for rank in range(1, world_size):
        p = ctx.Process(target=target, args=(rank, *args), name=f"nemoh-tp{rank}", daemon=True)
        p.start()
        processes.append(p)
    return processes

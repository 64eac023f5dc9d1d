"""Run a function on N gloo ranks in spawned processes (tests of nemoh.distributed)."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sys
import traceback

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entry(rank: int, world: int, init_method: str, fn, args, out_dir: str) -> None:
    import torch

    sys.path.insert(0, TESTS)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torch.set_num_threads(1)
    try:
        from nemoh.distributed.launch import RankInfo, init_ranks

        tp, _ = init_ranks(RankInfo(rank, world, rank, init_method), "cpu", None)
        result = fn(rank, tp, *args)
    except BaseException:
        result = RuntimeError(traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_ranks(fn, world: int, out_dir: str, *args, timeout: float = 120.0) -> list:
    """fn(rank, tp_group, *args) on `world` processes; returns each rank's result (raises a rank's error).
    tp_group.vocab_size is None: fn sets it (it is the model's)."""
    from nemoh.distributed.launch import free_init_method

    ctx = mp.get_context("spawn")
    init = free_init_method()
    procs = [ctx.Process(target=_entry, args=(r, world, init, fn, args, str(out_dir))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
    results = []
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.pkl"), "rb") as f:
            result = pickle.load(f)
        if isinstance(result, BaseException):
            raise result
        results.append(result)
    return results

"""Time one engine decode step for a batch of sequences, steady state, on engine_vs_hf.py's random checkpoint.

    python benchmarks/decode_step.py [--seqs 32] [--dtype float32 bfloat16] [--dir /tmp/nemoh-bench-ckpt]

First a few short requests are served and finished, as engine_vs_hf.py's warm-up does and as any running
server has done, so that the cache's free slots are in the order its allocator leaves them. Then the
sequences all start together (128-token prompts, prefilled first, then 8 warm-up steps); the timed steps
are plain decode steps of the whole batch (one new token per sequence), the median of 3 passes of 16 steps.
This is the inner loop of engine_vs_hf.py's 32-request throughput without its prefill, for looking at the
decode path alone (e.g. against an older revision: `git worktree add /tmp/old REV` and run this file with
`PYTHONPATH=/tmp/old`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_vs_hf import CONFIG, build_checkpoint, prompts, start_decode_batch  # noqa: E402


def main() -> None:
    import torch

    from nemoh import LLM, SamplingParams

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "nemoh-bench-ckpt"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    build_checkpoint(args.dir)
    for dtype in args.dtype:
        llm = LLM(args.dir, dtype=dtype, max_num_seqs=args.seqs, max_num_batched_tokens=128 * args.seqs,
                  cache_memory_gb=2.0)
        engine = llm.engine
        llm.generate(prompts(1, 128, CONFIG["vocab_size"]), SamplingParams(temperature=0, max_tokens=8))
        llm.generate(prompts(4, 128, CONFIG["vocab_size"]), SamplingParams(temperature=0, max_tokens=4))
        start_decode_batch(engine, args.seqs, 128,
                           SamplingParams(temperature=0, max_tokens=8 + 3 * 16 + 8, ignore_eos=True), warm_steps=8)
        passes = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(16):
                engine.step()
            passes.append((time.perf_counter() - start) / 16)
        assert engine.scheduler.num_running == args.seqs, "every timed step must decode the whole batch"
        step = statistics.median(passes)
        print(f"{dtype:>9}: {args.seqs} sequences, decode step {step * 1e3:.1f} ms "
              f"({args.seqs / step:.0f} tok/s), passes {', '.join(f'{p * 1e3:.1f}' for p in passes)} ms")
        while engine.has_unfinished_requests():
            engine.step()


if __name__ == "__main__":
    main()

"""Where a speculative decoding step of the demo model spends its time: per mixer, for a 1-token decode, a
(1 + k)-token verification and an MTP draft pass, single stream, greedy, on held-out prompts.

    python benchmarks/demo_layer_times.py [--k 0,3] [--prompts 12] [--dtype bfloat16]

Times are wall-clock between forward pre- and post-hooks on each mixer (and around the whole main-model
and MTP forwards), prefill excluded (more than 8 new tokens), warm-up excluded. The hooks themselves add a
few microseconds per call.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_eval import DEMO_DIR, prompts_for  # noqa: E402

from nemoh import LLM, SamplingParams  # noqa: E402
from nemoh.demo.corpus import generate  # noqa: E402


def instrument(llm: LLM, k: int, total: collections.Counter, calls: collections.Counter) -> None:
    """Hooks that add each mixer's and each whole forward's wall time (8 new tokens or fewer) under
    (k, forward, part, new tokens)."""
    model = llm.engine.model
    phase = ["main"]

    def record(key, seconds):
        total[(k, *key)] += seconds
        calls[(k, *key)] += 1

    def timed_mixer(module, name):
        def pre(m, inputs):
            m._nemoh_t0 = time.perf_counter()

        def post(m, inputs, output):
            n = inputs[0].shape[0]
            if n <= 8:
                record((phase[0], name, "1 token" if n == 1 else "2+ tokens"), time.perf_counter() - m._nemoh_t0)
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    for block in model.backbone.layers:
        timed_mixer(block.mixer, type(block.mixer).__name__)
    if model.mtp is not None:
        for layer in model.mtp.layers:
            timed_mixer(layer.mixer, type(layer.mixer).__name__)

    def timed_forward(fn, name):
        def wrapper(input_ids, *rest):
            phase[0] = name
            start = time.perf_counter()
            out = fn(input_ids, *rest)
            n = len(input_ids)
            if n <= 8:
                record((name, "whole forward", "1 token" if n == 1 else "2+ tokens"), time.perf_counter() - start)
            return out
        return wrapper

    model.forward_hidden = timed_forward(model.forward_hidden, "main")
    model.mtp_forward = timed_forward(model.mtp_forward, "mtp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEMO_DIR)
    ap.add_argument("--k", default="0,3", help="speculative tokens, one engine each (0: no MTP)")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype (default: the checkpoint's, as served)")
    args = ap.parse_args()
    prompts = prompts_for(generate("heldout", args.prompts, seed=2), args.model)
    ks = [int(k) for k in args.k.split(",")]
    total, calls = collections.Counter(), collections.Counter()
    llms = {}
    for k in ks:
        spec = {"method": "mtp", "num_speculative_tokens": k} if k else None
        llms[k] = LLM(args.model, dtype=args.dtype, max_num_seqs=1, speculative_config=spec)
        instrument(llms[k], k, total, calls)
    params = SamplingParams(temperature=0.0, max_tokens=192)
    for llm in llms.values():
        llm.generate(prompts[:2], params)                              # warm-up, excluded
    total.clear()
    calls.clear()
    for p in prompts:                   # the engines take turns prompt by prompt: a slow spell hits all alike
        for llm in llms.values():
            llm.generate([p], params)
    print(f"{args.model.name}, {args.dtype}, k={args.k}, {args.prompts} prompts, single stream, greedy")
    print(f"{'k':>2} {'forward':>7} {'part':>14} {'new tokens':>10} {'ms/call':>8} {'calls':>6}")
    for key in sorted(total):
        print(f"{key[0]:>2} {key[1]:>7} {key[2]:>14} {key[3]:>10} {total[key] / calls[key] * 1e3:>8.3f} {calls[key]:>6}")


if __name__ == "__main__":
    main()

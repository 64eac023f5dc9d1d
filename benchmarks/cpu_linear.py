"""`F.linear` against the oneDNN pre-packed product of `nemoh.models.linear`, on CPU, cold weights.

    python benchmarks/cpu_linear.py [--threads 2] [--dtype float32 bfloat16] [--rows 1 4 32] [--hot]

Shapes are engine_vs_hf.py's checkpoint's (out, in): lm_head, Mamba in_proj, the shared expert's up and
down, an expert's up and down in the latent width. Each timing cycles through enough copies of the weight
(about 300 MB) that none is in cache, as in a decode step of a model larger than the CPU's cache, where every
layer's weights are read once; the median of 5 passes of 40 products is shown, with the bytes of weight
read per second. With --hot: the demo model's shapes (lm_head, Mamba in_proj, q/k/v, an expert's up and
down, the shared expert's down), one copy each, so that the weight stays in cache as most of the small demo
model's do. The product is forced to the packed path here whatever its size (PACK_MIN_ELEMENTS, which this
table is for, keeps one row against a small weight on `F.linear`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import nemoh.models.linear as linear_module
from nemoh.models.linear import PACKED_DTYPES, PackedWeight

SHAPES = [(16384, 512), (2320, 512), (1024, 512), (512, 1024), (512, 256), (256, 512)]
DEMO_SHAPES = [(4096, 256), (648, 256), (512, 256), (256, 128), (128, 256), (256, 512)]


def median_us(fn, copies: int, passes: int = 5, calls: int = 40) -> float:
    for i in range(copies):
        fn(i)
    times = []
    for p in range(passes):
        start = time.perf_counter()
        for c in range(calls):
            fn((p * calls + c) % copies)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 32])
    ap.add_argument("--hot", action="store_true", help="the demo's shapes, weights in cache")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    linear_module.PACK_MIN_ELEMENTS = 0
    print(f"{'dtype':>8} {'rows':>4} {'out x in':>11} {'F.linear us':>11} {'packed us':>9} {'GB/s':>11} {'x':>5}")
    for name in args.dtype:
        dtype = getattr(torch, name)
        if dtype not in PACKED_DTYPES:
            print(f"{name}: not packed on this machine (F.linear is used)")
            continue
        for rows in args.rows:
            for out_f, in_f in DEMO_SHAPES if args.hot else SHAPES:
                mb = out_f * in_f * dtype.itemsize / 1e6
                copies = 1 if args.hot else max(4, int(300 / mb))
                weights = [torch.randn(out_f, in_f).to(dtype) for _ in range(copies)]
                packs = [PackedWeight() for _ in range(copies)]
                x = torch.randn(rows, in_f).to(dtype)
                with torch.inference_mode():
                    plain = median_us(lambda i: F.linear(x, weights[i]), copies)
                    packed = median_us(lambda i: packs[i].linear(x, weights[i]), copies)
                print(f"{name:>8} {rows:>4} {f'{out_f}x{in_f}':>11} {plain:>11.0f} {packed:>9.0f} "
                      f"{mb / plain * 1e3:>5.1f}/{mb / packed * 1e3:<5.1f} {plain / packed:>5.2f}")
                del weights, packs


if __name__ == "__main__":
    main()

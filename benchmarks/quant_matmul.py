"""Decode-shaped products: NVFP4 weight-only (nemoh's dequantise + matmul) vs dense BF16 and FP32.

Shapes are Super-like, scaled to fit a CPU: latent experts 1024->4096 and 4096->1024, a square
4096x4096 projection; batch 1, 4 and 16 tokens. For each product the table gives the best time
over the repeats (the CPUs are shared, so the minimum is the least noisy estimate), the bytes of
weight the method reads, its floor (those bytes / memory bandwidth measured in the same run with a
large tensor copy) and the time relative to BF16. Each call uses the next of several copies of the
weight (>= 128 MB of FP32 in all) so that, as in decode, weights come from memory, not from cache.
Fixed seeds; warm-up excluded. One thread by default (steadier on a shared machine).

    python benchmarks/quant_matmul.py [--repeats 10] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import torch
import torch.nn.functional as F

from nemoh.quant.nvfp4 import dequantize_nvfp4, quantize_nvfp4

SHAPES = [(4096, 1024), (1024, 4096), (4096, 4096)]  # (out, in)
BATCHES = [1, 4, 16]


def best_time(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bandwidths(nbytes: int = 256 * 1024**2, repeats: int = 10) -> tuple[float, float]:
    """(copy, read) bytes per second on a tensor far larger than cache: a copy counts read + write,
    a sum only reads. The floor uses the read rate (weights are only read)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy = 2 * nbytes / best_time(lambda: dst.copy_(src), repeats)
    read = nbytes / best_time(lambda: src.sum(), repeats)
    return copy, read


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    copy_bw, bandwidth = bandwidths()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); copy bandwidth "
          f"{copy_bw / 1e9:.1f} GB/s (read+write), read bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    header = f"{'shape (out x in)':>17} {'batch':>5} {'method':>14} {'time ms':>9} {'weight MB':>9} {'floor ms':>8} {'x floor':>7} {'vs bf16':>7}"
    print(header)
    print("-" * len(header))
    for out_f, in_f in SHAPES:
        copies = max(2, math.ceil(128 * 1024**2 / (out_f * in_f * 4)))
        ws = [torch.randn(out_f, in_f) * 0.02 for _ in range(copies)]
        w_bf16 = [w.to(torch.bfloat16) for w in ws]
        w_fp32 = ws
        w_nvfp4 = [quantize_nvfp4(w) for w in ws]
        nvfp4_bytes = sum(t.numel() * t.element_size() for t in w_nvfp4[0])
        for batch in BATCHES:
            x32 = torch.randn(batch, in_f)
            x16 = x32.to(torch.bfloat16)
            nxt = {name: itertools.cycle(range(copies)).__next__ for name in ("b", "f", "n16", "n32")}
            methods = {
                "bf16 dense": (lambda: F.linear(x16, w_bf16[nxt["b"]()]), w_bf16[0].numel() * 2),
                "fp32 dense": (lambda: F.linear(x32, w_fp32[nxt["f"]()]), w_fp32[0].numel() * 4),
                "nvfp4->bf16": (lambda: F.linear(x16, dequantize_nvfp4(*w_nvfp4[nxt["n16"]()], torch.bfloat16)), nvfp4_bytes),
                "nvfp4->fp32": (lambda: F.linear(x32, dequantize_nvfp4(*w_nvfp4[nxt["n32"]()], torch.float32)), nvfp4_bytes),
            }
            times = {name: best_time(fn, args.repeats) for name, (fn, _) in methods.items()}
            for name, (_, nbytes) in methods.items():
                floor = nbytes / bandwidth
                print(f"{f'{out_f} x {in_f}':>17} {batch:>5} {name:>14} {times[name] * 1e3:>9.3f} "
                      f"{nbytes / 1e6:>9.2f} {floor * 1e3:>8.3f} {times[name] / floor:>7.1f} "
                      f"{times[name] / times['bf16 dense']:>7.2f}")
        print()
    print("floor = weight bytes / read bandwidth. NVFP4 weight-only dequantises the whole weight on every")
    print("call, so it is bound by the dequantisation (table gather, scale multiply, dense temporary),")
    print("not by the packed bytes it reads.")


if __name__ == "__main__":
    main()

"""Decode- and verify-shaped products on this CPU: NVFP4 / FP8 / BF16 / FP32 weights, as nemoh runs them.

Each row times the layer's own forward — `NVFP4Linear` / `FP8Linear` (packed weights read by the native
kernels: nemoh.kernels.quant_dispatch) and `nemoh.models.linear.Linear` in bfloat16 / float32 (native
kernels as well) — and, for the quantized formats, the reference it replaced: dequantise the whole weight,
then `F.linear`. Shapes are Super's (REFERENCE.md §2): an expert's up and down in the latent width (2688 x 1024,
1024 x 2688), the latent projections (1024 x 4096, 4096 x 1024), a Mamba out_proj (4096 x 8192); rows 1, 4,
16 and 32 (single-stream decode, MTP verification, batches). Activations are bfloat16 for BF16 / NVFP4 / FP8
(as in a bfloat16 model) and float32 for FP32.

Every call uses the next of enough copies of the weight (>= 256 MB of packed bytes) that it comes from memory,
as in a decode step of a model larger than cache. Columns: the median time of 5 passes over the copies, the
packed bytes the product must read and their floor (bytes / the read bandwidth of a float32 sum over 256 MiB
in the same run), time / floor, and time relative to BF16 at the same shape and rows. Fixed seeds, warm-up
(including the kernels' one-off weight re-layout) excluded.

    python benchmarks/quant_matmul.py [--threads 2] [--rows 1 4 16 32] [--no-reference]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from nemoh.models.linear import Linear
from nemoh.quant.fp8 import dequantize_fp8, quantize_fp8
from nemoh.quant.linear import FP8Linear, NVFP4Linear
from nemoh.quant.nvfp4 import dequantize_nvfp4, quantize_nvfp4

SHAPES = [(2688, 1024), (1024, 2688), (1024, 4096), (4096, 1024), (4096, 8192)]   # (out, in)
FORMATS = ["nvfp4", "fp8", "bf16", "f32"]


def make_layer(fmt: str, n: int, k: int, gen: torch.Generator) -> torch.nn.Module:
    w = torch.randn(n, k, generator=gen) * 0.02
    if fmt in ("bf16", "f32"):
        m = Linear(k, n, bias=False)
        m.weight.data = w.to(torch.bfloat16 if fmt == "bf16" else torch.float32)
    elif fmt == "fp8":
        m = FP8Linear(k, n)
        q, s = quantize_fp8(w)
        m.weight.copy_(q)
        m.weight_scale.copy_(s)
    else:
        m = NVFP4Linear(k, n)
        p, s, s2 = quantize_nvfp4(w)
        m.weight.copy_(p)
        m.weight_scale.copy_(s)
        m.weight_scale_2.copy_(s2)
    return m.requires_grad_(False).eval()


def packed_bytes(m: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


def reference(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What nemoh did before its packed kernels: the whole weight dequantised, then a dense product."""
    if isinstance(m, NVFP4Linear):
        w = dequantize_nvfp4(m.weight, m.weight_scale, m.weight_scale_2, x.dtype)
    else:
        w = dequantize_fp8(m.weight, m.weight_scale, x.dtype)
    return F.linear(x, w)


def median_pass(fn, layers: list, x: torch.Tensor, passes: int = 5) -> float:
    """Median over passes of the mean time of one call, each call on the next layer copy."""
    for m in layers[:4]:
        fn(m, x)
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        for m in layers:
            fn(m, x)
        times.append((time.perf_counter() - t) / len(layers))
    return statistics.median(times)


def read_bandwidth(nbytes: int = 256 * 2 ** 20) -> float:
    src = torch.ones(nbytes // 4)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--shapes", nargs="+", default=None, help="OUTxIN, e.g. 2688x1024")
    ap.add_argument("--no-reference", action="store_true", help="skip the dequantise + F.linear rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    bandwidth = read_bandwidth()
    print(f"torch {torch.__version__}, {args.threads} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    header = (f"{'out x in':>11} {'rows':>4} {'format':>22} {'time us':>9} {'packed MB':>9} {'floor us':>8} "
              f"{'x floor':>7} {'vs bf16':>7}")
    print(header + "\n" + "-" * len(header))
    with torch.inference_mode():
        for n, k in shapes:
            gen = torch.Generator().manual_seed(n * 7 + k)
            layers, nbytes = {}, {}
            for fmt in FORMATS:
                one = make_layer(fmt, n, k, gen)
                nbytes[fmt] = packed_bytes(one)
                copies = max(4, math.ceil(256e6 / nbytes[fmt]))
                layers[fmt] = [one] + [make_layer(fmt, n, k, gen) for _ in range(copies - 1)]
            for rows in args.rows:
                x = torch.randn(rows, k, generator=gen)
                results = []
                for fmt in FORMATS:
                    xf = x if fmt == "f32" else x.to(torch.bfloat16)
                    results.append((fmt, nbytes[fmt], median_pass(lambda m, v: m(v), layers[fmt], xf)))
                    if fmt in ("nvfp4", "fp8") and not args.no_reference:
                        few = layers[fmt][: max(4, len(layers[fmt]) // 8)]
                        results.append((f"{fmt} dequant+F.linear", nbytes[fmt], median_pass(reference, few, xf)))
                bf16 = next(t for f, _, t in results if f == "bf16")
                for fmt, b, t in results:
                    floor = b / bandwidth
                    print(f"{f'{n}x{k}':>11} {rows:>4} {fmt:>22} {t * 1e6:>9.1f} {b / 1e6:>9.2f} {floor * 1e6:>8.1f} "
                          f"{t / floor:>7.1f} {t / bf16:>7.2f}", flush=True)
            print()
            del layers


if __name__ == "__main__":
    main()

"""GPU: the fused Triton experts and dense products reading NVFP4 / FP8 weights, against dequantise + product.

A Super-width LatentMoE layer's routed experts (512 experts, top-22, latent 1024, expert width 2688; REFERENCE.md
§2) in NVFP4 and FP8 at 1, 8, 32 and 256 tokens, then the layer's dense NVFP4 / FP8 projections (the latent
projections 4096 -> 1024 -> 4096) at the same row counts. Each row gives
- fused: `moe_triton.fused_experts` (align + two kernels + sum) replayed from a CUDA graph, as a captured decode
  step runs it, and `eager`, the same launched from Python (what the launches cost);
- GB/s: the packed weight bytes actually read (each selected expert's up and down weights once, counted by
  `ExpertWeights.selected_nbytes`; the dense weight) over the fused time, and that as a share of this device's
  HBM bandwidth measured in the same run with a 1 GiB device-to-device copy (H100 SXM's nominal is 3.35 TB/s,
  H200's 4.8 TB/s; a copy reaches roughly 85-90% of that). The goal at 1-32 tokens is >= 50%;
- dequant+mm: the competitor, `triton_reference.reference_experts` (the selected experts dequantised to bfloat16
  with nemoh.quant, one `F.grouped_mm` per projection), and for dense products the quantized module's own forward
  (dequantise the weight, `F.linear`); `x` is its time over the fused one;
- err: max |fused - competitor| / max |competitor| (bfloat16 rounding: expect ~1e-2 or less).
Times are medians from `triton.testing.do_bench`, which clears the L2 cache before each call, so weights come from
HBM as in a model's step. Expert popularity is skewed (Dirichlet(2) over experts), as trained routers are.
Fixed seeds; warm-up (which includes Triton's autotuning and compilation) excluded. The first run compiles
every configuration (about a minute per format); Triton's disk cache makes later runs faster. `--budget-s` stops
starting new rows once that much time has passed (the issue asks for < 8 minutes on one H100 / H200).

    python benchmarks/gpu_moe.py [--tokens 1 8 32 256] [--formats nvfp4 fp8] [--budget-s 420]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from nemoh.kernels.packed_weights import FORMAT_FP8, FORMAT_NVFP4, ExpertWeights, KernelWeight
from nemoh.kernels.triton_support import HAVE_TRITON
from nemoh.quant.fp8 import to_float8_e4m3
from nemoh.quant.nvfp4 import NVFP4_GROUP_SIZE

NUM_EXPERTS, TOP_K, LATENT, EXPERT_WIDTH, HIDDEN = 512, 22, 1024, 2688, 4096
DENSE_SHAPES = [(LATENT, HIDDEN), (HIDDEN, LATENT)]        # fc1_latent_proj, fc2_latent_proj: (out, in)
# Weights of about 0.02 (as trained ones): E2M1 magnitudes average 2.25, block scales lie in [1, 2)
NVFP4_TENSOR_SCALE = 0.006
FP8_SPREAD = 64.0


def random_weight(fmt: str, num: int, n: int, k: int, device: torch.device, gen: torch.Generator) -> KernelWeight:
    """`num` random (n, k) weights stacked, stored as `fmt` (random codes and scales: no quantisation needed)."""
    if fmt == "nvfp4":
        codes = torch.randint(0, 256, (num, n, k // 2), dtype=torch.uint8, device=device, generator=gen)
        block_scale = to_float8_e4m3(1 + torch.rand(num, n, k // NVFP4_GROUP_SIZE, device=device, generator=gen))
        scale = torch.full((num,), NVFP4_TENSOR_SCALE, device=device)
        return KernelWeight(FORMAT_NVFP4, codes, block_scale, scale, n, k)
    data = torch.empty(num, n, k, dtype=torch.float8_e4m3fn, device=device)
    for i in range(num):           # one expert at a time: the float32 temporary of all 512 would need 5.6 GB
        data[i] = to_float8_e4m3(torch.randn(n, k, device=device, generator=gen) * FP8_SPREAD)
    return KernelWeight(FORMAT_FP8, data, None, torch.full((num,), 0.02 / FP8_SPREAD, device=device), n, k)


def single(weight: KernelWeight) -> KernelWeight:
    """The first matrix of a stacked weight."""
    return KernelWeight(weight.format, weight.data[0], None if weight.block_scale is None else weight.block_scale[0],
                        weight.scale[0], weight.out_features, weight.in_features)


def skewed_routing(num_tokens: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights (num_tokens, k) float32, topk_ids (num_tokens, k)) with a skewed expert popularity."""
    popularity = torch.distributions.Dirichlet(torch.full((NUM_EXPERTS,), 2.0)).sample().to(device)
    ids = torch.multinomial(popularity.expand(num_tokens, -1), TOP_K, generator=gen)
    weights = torch.rand(num_tokens, TOP_K, device=device, generator=gen)
    return weights / weights.sum(-1, keepdim=True) * 5.0, ids


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting the read and the write."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def graph_ms(fn, rep: int) -> float:
    """Median ms of `fn` replayed from a CUDA graph (warmed up on a side stream first, as capture requires)."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=rep, return_mode="median")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 256])
    parser.add_argument("--formats", nargs="+", choices=["nvfp4", "fp8"], default=["nvfp4", "fp8"])
    parser.add_argument("--rep-ms", type=int, default=100, help="time budget of each measurement (do_bench's rep)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new row after this many seconds")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_moe.py needs a CUDA device (H100 / H200); torch.cuda.is_available() is False here. "
                 "The kernels' numerics are tested on the CPU: pytest tests/kernels/test_triton_kernels.py")
    if not HAVE_TRITON:
        sys.exit("benchmarks/gpu_moe.py needs triton (pip install triton)")
    import triton
    import triton.testing

    from nemoh.kernels.moe_triton import fused_experts
    from nemoh.kernels.quant_linear_triton import quant_linear
    from nemoh.kernels.triton_reference import dequantized, reference_experts

    start = time.perf_counter()
    device = torch.device("cuda")
    gen = torch.Generator(device).manual_seed(0)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)\n")
    header = (f"{'layer':>12} {'fmt':>5} {'tokens':>6} {'experts':>7} {'MB read':>8} {'fused ms':>8} {'GB/s':>6} "
              f"{'% BW':>5} {'eager ms':>8} {'dequant+mm':>10} {'x':>6} {'err':>8}")
    print(header)
    print("-" * len(header))

    def row(layer, fmt, tokens, selected, nbytes, fused, eager, competitor, err):
        print(f"{layer:>12} {fmt:>5} {tokens:>6} {selected:>7} {nbytes / 1e6:>8.1f} {fused:>8.3f} "
              f"{nbytes / fused / 1e6:>6.0f} {100 * nbytes / fused * 1e3 / bandwidth:>5.0f} {eager:>8.3f} "
              f"{competitor:>10.3f} {competitor / fused:>6.1f} {err:>8.1e}")

    skipped = []
    for fmt in args.formats:
        experts = ExpertWeights(random_weight(fmt, NUM_EXPERTS, EXPERT_WIDTH, LATENT, device, gen),
                                random_weight(fmt, NUM_EXPERTS, LATENT, EXPERT_WIDTH, device, gen))
        for tokens in args.tokens:
            if time.perf_counter() - start > args.budget_s:
                skipped.append(f"experts {fmt} {tokens}")
                continue
            weights, ids = skewed_routing(tokens, device, gen)
            u = torch.randn(tokens, LATENT, dtype=torch.bfloat16, device=device, generator=gen)
            fused = fused_experts(u, weights, ids, experts)            # autotunes on the first call per shape
            reference = reference_experts(u, weights, ids, experts)
            row("experts", fmt, tokens, int(torch.unique(ids).numel()), experts.selected_nbytes(ids),
                graph_ms(lambda: fused_experts(u, weights, ids, experts), args.rep_ms),
                triton.testing.do_bench(lambda: fused_experts(u, weights, ids, experts), rep=args.rep_ms,
                                        return_mode="median"),
                triton.testing.do_bench(lambda: reference_experts(u, weights, ids, experts), warmup=1,
                                        rep=args.rep_ms, return_mode="median"),
                relative_error(fused, reference))
        for out_features, in_features in DENSE_SHAPES:
            weight = single(random_weight(fmt, 1, out_features, in_features, device, gen))
            layer = f"{in_features}->{out_features}"
            for tokens in args.tokens:
                if time.perf_counter() - start > args.budget_s:
                    skipped.append(f"{layer} {fmt} {tokens}")
                    continue
                x = torch.randn(tokens, in_features, dtype=torch.bfloat16, device=device, generator=gen)
                out = quant_linear(x, weight)                           # autotunes on the first call per shape
                reference = F.linear(x, dequantized(weight))
                row(layer, fmt, tokens, "-", weight.matrix_nbytes(),
                    graph_ms(lambda: quant_linear(x, weight), args.rep_ms),
                    triton.testing.do_bench(lambda: quant_linear(x, weight), rep=args.rep_ms, return_mode="median"),
                    triton.testing.do_bench(lambda: F.linear(x, dequantized(weight)), rep=args.rep_ms,
                                            return_mode="median"),
                    relative_error(out, reference))
        print()
    if skipped:
        print(f"over the {args.budget_s:.0f} s budget, skipped: {', '.join(skipped)}")
    print(f"total {time.perf_counter() - start:.0f} s. % BW: the packed bytes read over the fused time, as a share of "
          "the measured copy bandwidth.")


if __name__ == "__main__":
    main()

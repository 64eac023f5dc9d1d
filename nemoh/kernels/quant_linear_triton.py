"""Dense weight-only products on a GPU: y = x @ W^T with W read as stored (NVFP4, FP8 or BF16) by a Triton kernel.

Entry points:
  linear(x, module)          module(x), through the kernel for an `NVFP4Linear` / `FP8Linear` (any other module is
                             called as it is): x (..., in_features) -> (..., out_features) in x's dtype
  quant_linear(x, weight)    the same for a `packed_weights.KernelWeight` (e.g. `kernel_weight(module)`)
Reference: the module's own forward (nemoh.quant: dequantise the whole weight, then `F.linear`);
tests/kernels/test_triton_kernels.py checks the two agree under the interpreter.

Each program computes a (BLOCK_N weight rows, BLOCK_M rows of x) tile, the weight as the left operand of `tl.dot`
(it is dequantised in registers, and Hopper's wgmma takes its left operand from registers with 64 rows; see
quant_triton.py for the dequantisation and moe_triton.py for the same choice). Two regimes:
- decode (few rows of x): one row tile, so the weight's N / BLOCK_N column tiles alone would leave most SMs idle;
  K is split over SPLIT_K programs (about two programs per SM, each split at least 256 inputs), each writing a
  float32 partial product, summed afterwards (deterministic, unlike atomics, and no zeroed output needed).
- prefill (many rows): BLOCK_M up to 128, no split; the grid runs the column tiles of one row tile together, so a
  row tile of x is read from L2 by all of them and the weight (2.4 MB for a 4096 x 1024 NVFP4 one) stays in L2.
No host sync and shapes from x's shape alone, so it composes with captured steps; autotuning (GPU only) happens on
the first call per (N, K, BLOCK_M, SPLIT_K, format): make it before capturing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from nemoh.kernels.packed_weights import KernelWeight, kernel_weight
from nemoh.kernels.quant_triton import INTERPRETED, cast_out, tensor_scale, to_bf16, weight_tile
from nemoh.quant.linear import FP8Linear, NVFP4Linear

# An H100 SXM's SM count, for splitting K where no CUDA device says otherwise (the interpreter).
_DEFAULT_SMS = 132
_MIN_SPLIT_INPUTS = 256


def _configs() -> list[triton.Config]:
    """Tiles over (weight rows, K); BLOCK_M and SPLIT_K are chosen from x's rows (`_plan`). Interpreted: one small
    tile, as in moe_triton."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    shapes = [(64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 4), (128, 128, 8, 3), (128, 64, 8, 4), (32, 128, 4, 4)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in shapes]


@triton.autotune(configs=_configs(), key=["N", "K", "BLOCK_M", "SPLIT_K", "FORMAT"])
@triton.jit
def _linear_kernel(x_ptr, w_ptr, block_scale_ptr, scale_ptr, out_ptr, M, N, K,
                   stride_xm, stride_wn, stride_sn, stride_os, stride_om,
                   SPLIT_K: tl.constexpr, FORMAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    """out[split] (M, N) = x[:, this split's K range] @ W[:, same]^T, times the tensor scale."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    # whole BLOCK_K tiles per split, so an NVFP4 split starts on a scale block
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = pid_s * tiles_per_split * BLOCK_K
    k_end = tl.minimum(K, k_begin + tiles_per_split * BLOCK_K)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None],
                    mask=m_mask[None, :] & (offs_k[:, None] < K), other=0.0)
        w = weight_tile(w_ptr, block_scale_ptr, offs_n, k0, N, K, stride_wn, stride_sn, FORMAT, BLOCK_N, BLOCK_K,
                        INTERPRET)
        acc = tl.dot(w, to_bf16(x, INTERPRET), acc)
    acc = acc * tensor_scale(scale_ptr, 0, FORMAT)
    out = cast_out(acc, out_ptr.dtype.element_ty, INTERPRET)
    out_ptrs = out_ptr + pid_s * stride_os + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
    tl.store(out_ptrs, out, mask=(offs_n[:, None] < N) & m_mask[None, :])


def _plan(m: int, n: int, k: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, SPLIT_K) for x with m rows: the smallest tensor-core tile that covers m (at most 128); for a
    single row tile, K split in two until about two programs per SM (counting 64-row weight tiles) or until a split
    would get fewer than 256 inputs."""
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else _DEFAULT_SMS
    split_k = 1
    if m <= block_m:
        while triton.cdiv(n, 64) * split_k < 2 * num_sms and k // (2 * split_k) >= _MIN_SPLIT_INPUTS:
            split_k *= 2
    return block_m, split_k


def quant_linear(x: torch.Tensor, weight: KernelWeight, split_k: int | None = None) -> torch.Tensor:
    """x: (..., K) -> (..., N) = x @ W^T in x's dtype, W as `weight` stores it (a single matrix, not stacked).
    split_k: how many programs share K (default: `_plan`; the tests force others)."""
    if weight.num_experts is not None:
        raise ValueError("quant_linear takes a single weight (N, K), not stacked experts")
    n, k = weight.out_features, weight.in_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} inputs, the weight {k}")
    rows = x.reshape(-1, k)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    block_m, planned_split = _plan(m, n, k, x.device)
    split_k = split_k or planned_split
    if split_k == 1:
        out = torch.empty(1, m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    block_scale = weight.data if weight.block_scale is None else weight.block_scale
    scale = weight.data if weight.scale is None else weight.scale

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m), split_k)

    _linear_kernel[grid](rows, weight.data, block_scale, scale, out, m, n, k, rows.stride(0), weight.data.stride(0),
                         block_scale.stride(0), out.stride(0), out.stride(1), SPLIT_K=split_k, FORMAT=weight.format,
                         BLOCK_M=block_m, INTERPRET=INTERPRETED)
    result = out[0] if split_k == 1 else out.sum(0).to(x.dtype)
    return result.view(*x.shape[:-1], n)


def linear(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """module(x), through `quant_linear` when the module is an NVFP4Linear or FP8Linear."""
    if isinstance(module, (NVFP4Linear, FP8Linear)):
        return quant_linear(x, kernel_weight(module))
    return module(x)

"""Triton building blocks shared by the weight-only kernels: a weight tile read as stored and dequantised in
registers, and the bfloat16 operands of `tl.dot`.

`weight_tile` returns W[n, k0:k0 + BLOCK_K] for BLOCK_N rows as a tensor-core operand (bfloat16), from any
`packed_weights` format, *without* the per-tensor (per-expert) float32 scale: that one factor multiplies the
float32 accumulator once, in the caller's epilogue, instead of every weight in the K loop. What remains is exact
in bfloat16:
  NVFP4  e2m1 * block_scale: a 2-significant-bit value times an E4M3 scale (4 bits) has at most 6 significant
         bits, and |e2m1 * block_scale| lies in [2^-10, 2688] (0 aside), well inside bfloat16's range
  FP8    the E4M3 value itself (3 mantissa bits)
so the only roundings are the float32 accumulation and the final scale, and the tile equals nemoh.quant's
dequantisation with a unit tensor scale bit for bit (tests/kernels check this).

E2M1 in registers: a code s.e1e0.m (sign, two exponent bits, one mantissa bit) placed into a float16 as
s.000e1e0.m000000000 is the float16 with exponent field e and top mantissa bit m: its value is e2m1 * 2^-14 for all
16 codes (e = 0 lands on float16's subnormals exactly as E2M1's subnormal 0.5 does), so two shifts and masks per
nibble and one float16 -> float32 conversion decode it, and 2^14 is folded into the block scale.

The interpreter (`TRITON_INTERPRET=1`, the CPU tests) holds bfloat16 as raw uint16 and, unlike a GPU, multiplies
those bit patterns in `tl.dot` (triton-lang/triton#11584: bfloat16 is not supported there) and truncates in float32
-> bfloat16 casts. `INTERPRETED` is true when Triton runs interpreted (`triton.jit` decides when a function is
decorated, i.e. when this module is imported), and kernels pass it to `to_bf16`, which then rounds to nearest-even
by integer arithmetic and keeps the bfloat16 values in float32 containers: `tl.dot` of those is exactly the
bfloat16 product with float32 accumulation that the tensor cores compute, up to the order of the additions. On a GPU
the branch is compiled out and `to_bf16` is a plain cast.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from nemoh.kernels.packed_weights import FORMAT_BF16, FORMAT_NVFP4

_BF16 = tl.constexpr(FORMAT_BF16)
_NVFP4 = tl.constexpr(FORMAT_NVFP4)


@triton.jit
def to_bf16(x, INTERPRET: tl.constexpr):
    """x as a bfloat16 tensor-core operand (round to nearest even); interpreted, the same values in float32."""
    if INTERPRET:
        if x.dtype == tl.bfloat16:
            return x.to(tl.float32)
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(tl.bfloat16)


# `triton.jit` returns an InterpretedFunction when Triton runs interpreted: the same test Triton itself made
INTERPRETED: bool = isinstance(to_bf16, InterpretedFunction)


@triton.jit
def cast_out(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 x cast to DTYPE for a store, bfloat16 rounded to nearest even interpreted too."""
    if DTYPE == tl.bfloat16:
        return to_bf16(x, INTERPRET).to(tl.bfloat16)
    else:
        return x.to(DTYPE)


@triton.jit
def tensor_scale(scale_ptr, index, FORMAT: tl.constexpr):
    """The per-tensor (per-expert) float32 scale that `weight_tile` leaves out; 1 for BF16 weights."""
    if FORMAT == _BF16:
        return 1.0
    else:
        return tl.load(scale_ptr + index)


@triton.jit
def _e2m1_times_2_pow_14(code):
    """uint16 E2M1 codes (0-15) -> float32 values times 2^-14 (see the module docstring)."""
    bits = ((code & 0x8) << 12) | ((code & 0x7) << 9)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def weight_tile(w_ptr, block_scale_ptr, offs_n, k0, N, K, stride_wn, stride_sn,
                FORMAT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    """W[offs_n, k0:k0+BLOCK_K] without its tensor scale, as a (BLOCK_N, BLOCK_K) bfloat16 dot operand; zero
    outside (N, K). w_ptr / block_scale_ptr point at the matrix (an expert's, for stacked weights); K's stride is 1.
    For NVFP4, k0 and BLOCK_K are multiples of 16 and K is one (the format's scale block)."""
    n_mask = offs_n < N
    if FORMAT == _NVFP4:
        # the tile as (rows, scale blocks, 8 bytes): each byte's two codes share its block's scale, so the scale
        # broadcasts over the last axis and only the final interleave of the two nibbles reshapes
        GROUPS: tl.constexpr = BLOCK_K // 16
        offs_g = k0 // 16 + tl.arange(0, GROUPS)
        offs_b = tl.arange(0, 8)
        g_mask = n_mask[:, None] & (offs_g[None, :] < K // 16)
        codes_ptr = w_ptr + offs_n[:, None, None] * stride_wn + offs_g[None, :, None] * 8 + offs_b[None, None, :]
        packed = tl.load(codes_ptr, mask=g_mask[:, :, None], other=0).to(tl.uint16)
        block_scale = tl.load(block_scale_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=g_mask,
                              other=0.0)
        block_scale = (block_scale.to(tl.float32) * 16384.0)[:, :, None]
        low = _e2m1_times_2_pow_14(packed & 0xF) * block_scale        # element 2i: the low nibble
        high = _e2m1_times_2_pow_14(packed >> 4) * block_scale
        w = tl.join(low, high).reshape(BLOCK_N, BLOCK_K)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=n_mask[:, None] & (offs_k[None, :] < K), other=0.0)
    return to_bf16(w, INTERPRET)

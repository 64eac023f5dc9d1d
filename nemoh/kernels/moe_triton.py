"""Fused routed experts of a LatentMoE on a GPU: Triton kernels that read NVFP4 / FP8 / BF16 expert weights as stored.

Entry points (REFERENCE.md §1, LatentMoE steps 4-5):
  experts = stack_experts(moe)                      once per layer, after loading (packed_weights.py)
  routed = fused_experts(u, topk_weights, topk_ids, experts)
      u (num_tokens, L) latent activations, topk_weights (num_tokens, k) float32 and topk_ids (num_tokens, k)
      from `moe.gate` -> (num_tokens, L) in u's dtype: sum_j topk_weights[t, j] * down_e(relu2(up_e(u[t]))),
      e = topk_ids[t, j]. It replaces `LatentMoE._run_experts`.
  out = latent_moe_forward(moe, x, experts)         the whole layer: router, latent projections (Triton
                                                    products when quantized), fused experts, shared expert
Reference: `triton_reference.reference_experts` (dequantise with nemoh.quant, then grouped products) and the model's
own `LatentMoE._sorted_experts`; tests/kernels/test_triton_kernels.py checks both under the interpreter.

How a call runs:
1. moe_align sorts the (token, expert) pairs by expert into blocks of BLOCK_M (moe_align.py), on the device.
2. up kernel: program (block, n-tile) gathers its block's BLOCK_M token rows of u, multiplies them by its expert's
   up weight tile by tile, dequantised in registers (quant_triton.weight_tile), bfloat16 tensor-core products with
   float32 accumulation; epilogue: the expert's tensor scale, relu², bfloat16, stored at the pairs' sorted rows of
   a workspace h (max_blocks * BLOCK_M, I).
3. down kernel: the same over h's rows and the down weights; epilogue: tensor scale, times the pair's routing
   weight, stored in float32 at the pair's own row of pair_out (num_tokens * k, L).
4. pair_out viewed (num_tokens, k, L) summed over k in float32 (as the model's index_add does), cast to u's dtype.
Step 3 writes each pair's row and step 4 sums, instead of atomically adding into the token's row: the result is
deterministic and the same for a token whatever else is in its batch, needs no zeroed output and no atomics
contending on one token's row (a decode token's 22 experts all write the same 1024 values), and lets the autotuner
rerun the kernel freely (atomics would need `reset_to_zero`). The extra traffic is num_tokens * k * L * 4 bytes
written and read, 90 KB for one Super decode token against 68 MB of NVFP4 weights.

The weight tile is the *left* operand (acc is (BLOCK_N, BLOCK_M), out^T = W @ u^T): it is computed in registers,
Hopper's wgmma takes its left operand from registers and needs 64 rows, which the weight rows fill even for a
single token, while the activations (the right operand, from shared memory) need only 16 columns.

Composes with a captured step (CUDA graph): no host sync, every shape follows from (num_tokens, k, E, BLOCK_M),
blocks past the valid count exit at once. Autotuning (GPU only) benchmarks the configurations on the first call
for each key (N, K, BLOCK_M, format, projection): make that call before capturing, e.g. run each batch bucket once
eagerly. Workspace: h is max_blocks * BLOCK_M * I bfloat16 values (Super, 256 tokens: 832 * 16 * 2688 * 2 B = 72 MB).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from nemoh.kernels.moe_align import MoEAlignment, choose_block_m, moe_align
from nemoh.kernels.packed_weights import ExpertWeights, KernelWeight
from nemoh.kernels.quant_linear_triton import linear
from nemoh.kernels.quant_triton import INTERPRETED, cast_out, tensor_scale, to_bf16, weight_tile
from nemoh.models.mlp import relu2


def _configs() -> list[triton.Config]:
    """Tiles over (weight rows, K). BLOCK_M is not tuned: it fixes the sorted layout, so moe_align chooses it.
    Interpreted, one small tile keeps the CPU tests fast (and an autotuner with one config benchmarks nothing)."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    shapes = [(64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 4), (128, 128, 8, 3), (32, 128, 4, 4), (128, 64, 4, 5)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in shapes]


@triton.autotune(configs=_configs(), key=["N", "K", "BLOCK_M", "FORMAT", "UP"])
@triton.jit
def _expert_kernel(a_ptr, w_ptr, block_scale_ptr, scale_ptr, out_ptr, topk_weights_ptr,
                   sorted_pair_ids_ptr, expert_ids_ptr, num_valid_blocks_ptr, num_pairs, N, K,
                   stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_om,
                   UP: tl.constexpr, TOP_K: tl.constexpr, FORMAT: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    """One (block of BLOCK_M same-expert pairs, BLOCK_N weight rows) tile of an expert projection.
    UP: a = u (num_tokens, K) gathered by token, out = h (rows, N) bfloat16 by sorted row, relu² epilogue.
    down: a = h by sorted row, out = pair_out (num_pairs, N) float32 by pair, routing-weight epilogue."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m >= tl.load(num_valid_blocks_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pair_ids_ptr + offs_m)
    m_mask = pairs < num_pairs
    if UP:
        a_rows = (pairs // TOP_K).to(tl.int64)
    else:
        a_rows = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_ptr += expert * stride_we
    block_scale_ptr += expert * stride_se

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + a_rows[None, :] * stride_am + offs_k[:, None],
                    mask=m_mask[None, :] & (offs_k[:, None] < K), other=0.0)
        w = weight_tile(w_ptr, block_scale_ptr, offs_n, k0, N, K, stride_wn, stride_sn, FORMAT, BLOCK_N, BLOCK_K,
                        INTERPRET)
        acc = tl.dot(w, to_bf16(a, INTERPRET), acc)

    acc = acc * tensor_scale(scale_ptr, expert, FORMAT)
    out_mask = (offs_n[:, None] < N) & m_mask[None, :]
    if UP:
        acc = tl.maximum(acc, 0.0)
        out = cast_out(acc * acc, tl.bfloat16, INTERPRET)
        tl.store(out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None], out, mask=out_mask)
    else:
        acc = acc * tl.load(topk_weights_ptr + pairs, mask=m_mask, other=0.0)[None, :]
        tl.store(out_ptr + pairs[None, :].to(tl.int64) * stride_om + offs_n[:, None], acc, mask=out_mask)


def _launch(a: torch.Tensor, weight: KernelWeight, out: torch.Tensor, topk_weights: torch.Tensor,
            align: MoEAlignment, up: bool, top_k: int) -> None:
    # formats without a block scale / tensor scale pass the weight itself: those pointers are never read
    block_scale = weight.data if weight.block_scale is None else weight.block_scale
    scale = weight.data if weight.scale is None else weight.scale
    n = weight.out_features

    def grid(meta):
        return (align.max_blocks, triton.cdiv(n, meta["BLOCK_N"]))

    _expert_kernel[grid](
        a, weight.data, block_scale, scale, out, topk_weights, align.sorted_pair_ids, align.expert_ids,
        align.num_valid_blocks, align.num_pairs, n, weight.in_features,
        a.stride(0), weight.data.stride(0), weight.data.stride(1), block_scale.stride(0), block_scale.stride(-2),
        out.stride(0), UP=up, TOP_K=top_k, FORMAT=weight.format, BLOCK_M=align.block_m, INTERPRET=INTERPRETED)


def fused_experts(u: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts: ExpertWeights,
                  block_m: int | None = None) -> torch.Tensor:
    """u: (num_tokens, L), topk_weights: (num_tokens, k) float32, topk_ids: (num_tokens, k) -> (num_tokens, L) in
    u's dtype. block_m: the rows per block (default: `choose_block_m` for the batch; the tests force others)."""
    num_tokens, top_k = topk_ids.shape
    width, inter = experts.width, experts.intermediate_size
    if u.dim() != 2 or u.shape != (num_tokens, width) or u.stride(1) != 1:
        raise ValueError(f"u must be a row-contiguous ({num_tokens}, {width}) tensor, got {tuple(u.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} differ")
    num_pairs = num_tokens * top_k
    block_m = block_m or choose_block_m(num_pairs, experts.num_experts)
    align = moe_align(topk_ids, experts.num_experts, block_m)
    weights = topk_weights.reshape(-1).to(torch.float32)

    h = torch.empty(align.max_blocks * block_m, inter, dtype=torch.bfloat16, device=u.device)
    pair_out = torch.empty(num_pairs, width, dtype=torch.float32, device=u.device)
    _launch(u, experts.up, h, weights, align, up=True, top_k=top_k)
    _launch(h, experts.down, pair_out, weights, align, up=False, top_k=top_k)
    return pair_out.view(num_tokens, top_k, width).sum(1).to(u.dtype)


def latent_moe_forward(moe: nn.Module, x: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
    """A whole `LatentMoE` layer with the fused experts: x (num_tokens, hidden) -> (num_tokens, hidden). The
    latent projections and the shared expert go through `quant_linear_triton.linear` (Triton products for NVFP4 /
    FP8 modules, the module itself otherwise)."""
    weights, ids = moe.gate(x)                                                                         # 1.-3.
    u = linear(x, moe.fc1_latent_proj) if moe.latent_size is not None else x                           # 4.
    routed = fused_experts(u.contiguous(), weights, ids, experts)
    if moe.latent_size is not None:
        routed = linear(routed, moe.fc2_latent_proj)
    shared = moe.shared_experts
    return routed + linear(relu2(linear(x, shared.up_proj)), shared.down_proj)                           # 5.

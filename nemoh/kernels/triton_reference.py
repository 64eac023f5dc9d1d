"""The plain PyTorch paths the Triton kernels are tested and benchmarked against (no Triton needed here).

- `dequantized(weight, dtype)`: a `KernelWeight` (single or stacked experts) dequantised with nemoh.quant.
- `reference_experts(u, topk_weights, topk_ids, experts)`: dequantise + grouped product, the routed experts as a
  GPU would run them without the fused kernels: the selected experts' weights dequantised to bfloat16, one
  `F.grouped_mm` per projection over the expert-sorted pairs, relu², the routing weights, a float32 sum per
  token. It is the competitor in benchmarks/gpu_moe.py and an oracle in the tests (beside the model's own
  `LatentMoE._sorted_experts`). It synchronises (`torch.unique`): a reference, not a captured-step path.
The dense products' reference is the quantized module's own forward (dequantise, then `F.linear`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nemoh.kernels.packed_weights import FORMAT_FP8, FORMAT_NVFP4, ExpertWeights, KernelWeight
from nemoh.models.mlp import relu2
from nemoh.quant.fp8 import dequantize_fp8
from nemoh.quant.nvfp4 import dequantize_nvfp4


def dequantized(weight: KernelWeight, dtype: torch.dtype = torch.bfloat16,
                experts: torch.Tensor | None = None) -> torch.Tensor:
    """(N, K), or (len(experts), N, K) for the listed experts of a stacked weight (all of them by default), in
    `dtype`; each expert with its own tensor scale, exactly as nemoh.quant dequantises one module's weight."""
    if weight.num_experts is None:
        return _dequantize_one(weight.format, weight.data, weight.block_scale, weight.scale, dtype)
    selected = range(weight.num_experts) if experts is None else experts.tolist()
    return torch.stack([
        _dequantize_one(weight.format, weight.data[e], None if weight.block_scale is None else weight.block_scale[e],
                        None if weight.scale is None else weight.scale[e], dtype)
        for e in selected])


def _dequantize_one(fmt: int, data: torch.Tensor, block_scale: torch.Tensor | None, scale: torch.Tensor | None,
                    dtype: torch.dtype) -> torch.Tensor:
    if fmt == FORMAT_NVFP4:
        return dequantize_nvfp4(data, block_scale, scale, dtype)
    if fmt == FORMAT_FP8:
        return dequantize_fp8(data, scale, dtype)
    return data.to(dtype)


def reference_experts(u: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      experts: ExpertWeights) -> torch.Tensor:
    """u: (num_tokens, L), topk_weights / topk_ids: (num_tokens, k) -> (num_tokens, L) in u's dtype."""
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    used, expert_of_pair = torch.unique(flat, return_inverse=True)      # only the selected experts are dequantised
    order = torch.argsort(expert_of_pair, stable=True)
    offsets = torch.cumsum(torch.bincount(expert_of_pair, minlength=len(used)), 0).to(torch.int32)
    up = dequantized(experts.up, torch.bfloat16, used)                   # (used, I, L)
    down = dequantized(experts.down, torch.bfloat16, used)               # (used, L, I)
    inputs = u[order // top_k].to(torch.bfloat16)
    hidden = relu2(F.grouped_mm(inputs, up.transpose(1, 2), offs=offsets))
    pair_out = F.grouped_mm(hidden, down.transpose(1, 2), offs=offsets).float()
    pair_out = pair_out * topk_weights.reshape(-1)[order, None].float()
    out = torch.zeros(num_tokens, experts.width, dtype=torch.float32, device=u.device)
    return out.index_add_(0, order // top_k, pair_out).to(u.dtype)

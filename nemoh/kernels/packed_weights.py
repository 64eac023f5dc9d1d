"""The GPU kernels' view of a weight as stored: NVFP4 codes and scales, FP8 bytes, or BF16, never dequantised.

A `KernelWeight` names the tensors one linear weight W: (N, K) (or E experts' weights stacked to (E, N, K)) is
read from, and how (REFERENCE.md §4):

  format        data                           block_scale                     scale
  FORMAT_NVFP4  uint8 (..., N, K/2) E2M1 codes  float8_e4m3fn (..., N, K/16)    float32 (...) per tensor / expert
  FORMAT_FP8    float8_e4m3fn (..., N, K)      -                               float32 (...) per tensor / expert
  FORMAT_BF16   bfloat16 (..., N, K)           -                               -

`kernel_weight(module)` describes an `NVFP4Linear`, `FP8Linear` or bfloat16 `Linear` without copying anything.
`stack_experts(moe)` describes a `LatentMoE`'s experts as (E, ...) tensors. nemoh keeps each expert as its own
module (the checkpoint's layout); the kernels want one tensor per buffer kind so that an expert is an offset.
The stacked tensors are the MoE's own (`LatentMoE.stacked_expert_tensor`, shared with its graph-safe step): like
`SharedWeight` (nemoh/models/fused.py), the stacking is done once and every expert's buffers are re-pointed at their
slice of the stacked tensor, so the model still holds one copy of its experts: memory after the call is
what it was before (plus a few bytes of views); during the call, one buffer kind of one layer exists twice (Super:
the up projection's codes, 512 x 2688 x 512 bytes = 0.7 GB, for an instant). BF16 experts use the model's own
stacked weights (`LatentMoE._stacked_weights`, the tensors its grouped product reads), so the two paths share them
too. The result describes the weights as they are at the call: rebuild it after the model's weights are replaced
(a reload, `.to()`); an in-place `copy_` into the module buffers is seen, since they are views.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nemoh.quant.fp8 import FP8_DTYPE
from nemoh.quant.linear import FP8Linear, NVFP4Linear
from nemoh.quant.nvfp4 import NVFP4_GROUP_SIZE

FORMAT_BF16, FORMAT_FP8, FORMAT_NVFP4 = 0, 1, 2
FORMAT_NAMES = {FORMAT_BF16: "bf16", FORMAT_FP8: "fp8", FORMAT_NVFP4: "nvfp4"}


@dataclass(frozen=True)
class KernelWeight:
    """One weight (N, K), or E stacked ones (E, N, K), as stored; see the module docstring for the layouts."""

    format: int
    data: torch.Tensor
    block_scale: torch.Tensor | None
    scale: torch.Tensor | None
    out_features: int
    in_features: int

    def __post_init__(self) -> None:
        n, k = self.out_features, self.in_features
        lead = tuple(self.data.shape[:-2])
        if self.format == FORMAT_NVFP4:
            expected = [(self.data, (n, k // 2), torch.uint8),
                        (self.block_scale, (n, k // NVFP4_GROUP_SIZE), FP8_DTYPE), (self.scale, (), torch.float32)]
        elif self.format == FORMAT_FP8:
            expected = [(self.data, (n, k), FP8_DTYPE), (self.scale, (), torch.float32)]
        elif self.format == FORMAT_BF16:
            expected = [(self.data, (n, k), torch.bfloat16)]
        else:
            raise ValueError(f"format: unknown weight format {self.format}")
        for tensor, shape, dtype in expected:
            if tensor is None or tuple(tensor.shape) != lead + shape or tensor.dtype != dtype:
                got = None if tensor is None else (tensor.dtype, tuple(tensor.shape))
                raise ValueError(f"{FORMAT_NAMES[self.format]} weight ({n}, {k}): expected {dtype} {lead + shape}, "
                                 f"got {got}")
            if tensor.dim() >= 1 and tensor.stride(-1) != 1:
                raise ValueError(f"{FORMAT_NAMES[self.format]} weight: the last dimension must be contiguous")

    @property
    def num_experts(self) -> int | None:
        """E for stacked expert weights, None for a single weight."""
        return self.data.shape[0] if self.data.dim() == 3 else None

    def matrix_nbytes(self) -> int:
        """Bytes the kernels read for one whole (N, K) matrix: codes + block scales + the fp32 scale, or the
        FP8 / BF16 values (+ scale)."""
        n, k = self.out_features, self.in_features
        if self.format == FORMAT_NVFP4:
            return n * k // 2 + n * k // NVFP4_GROUP_SIZE + 4
        if self.format == FORMAT_FP8:
            return n * k + 4
        return 2 * n * k


def kernel_weight(module: nn.Module) -> KernelWeight:
    """The kernels' view of an `NVFP4Linear`, `FP8Linear` or bias-free bfloat16 `nn.Linear` (no copy)."""
    if isinstance(module, NVFP4Linear):
        return KernelWeight(FORMAT_NVFP4, module.weight, module.weight_scale, module.weight_scale_2,
                            module.out_features, module.in_features)
    if isinstance(module, FP8Linear):
        return KernelWeight(FORMAT_FP8, module.weight, None, module.weight_scale, module.out_features,
                            module.in_features)
    if isinstance(module, nn.Linear) and module.bias is None:
        return KernelWeight(FORMAT_BF16, module.weight, None, None, module.out_features, module.in_features)
    raise ValueError(f"no GPU kernel reads a {type(module).__name__} weight (NVFP4Linear, FP8Linear or a bias-free "
                     "bfloat16 Linear)")


@dataclass(frozen=True)
class ExpertWeights:
    """A LatentMoE's routed experts stacked: up (E, I, L) and down (E, L, I) as `KernelWeight`s (each projection
    has its own format, so a mixed-precision checkpoint's experts work too)."""

    up: KernelWeight
    down: KernelWeight

    def __post_init__(self) -> None:
        if self.up.num_experts is None or self.up.num_experts != self.down.num_experts:
            raise ValueError("ExpertWeights: up and down must both be stacked (E, N, K) with the same E")
        if (self.up.out_features, self.up.in_features) != (self.down.in_features, self.down.out_features):
            raise ValueError(f"ExpertWeights: up (I, L) = {(self.up.out_features, self.up.in_features)} does not "
                             f"match down (L, I) = {(self.down.out_features, self.down.in_features)}")

    @property
    def num_experts(self) -> int:
        return self.up.num_experts

    @property
    def width(self) -> int:
        """L: the experts' input and output width (the latent size for a LatentMoE with one)."""
        return self.up.in_features

    @property
    def intermediate_size(self) -> int:
        return self.up.out_features

    def expert_nbytes(self) -> int:
        """Bytes of weights one expert's up and down projections read in full."""
        return self.up.matrix_nbytes() + self.down.matrix_nbytes()

    def selected_nbytes(self, topk_ids: torch.Tensor) -> int:
        """Bytes of weights a pass over `topk_ids` (num_tokens, k) reads: each selected expert once, however many
        tokens chose it. Host-side accounting for benchmarks (it synchronises)."""
        return int(torch.unique(topk_ids).numel()) * self.expert_nbytes()


def _stacked_projection(moe: nn.Module, which: str, modules: list[nn.Module],
                        stacked_bf16: torch.Tensor | None) -> KernelWeight:
    kind = type(modules[0])
    if any(type(m) is not kind for m in modules):
        raise ValueError(f"stack_experts: the experts' projections mix {sorted({type(m).__name__ for m in modules})}")
    first = kernel_weight(modules[0])           # checks the module kind and its dtypes
    n, k = first.out_features, first.in_features

    def stack(name: str) -> torch.Tensor:
        # the MoE's own stacked tensors, which its graph-safe step reads too: one copy, stacked once
        return moe.stacked_expert_tensor(which, name)

    if first.format == FORMAT_NVFP4:
        return KernelWeight(FORMAT_NVFP4, stack("weight"), stack("weight_scale"), stack("weight_scale_2"), n, k)
    if first.format == FORMAT_FP8:
        return KernelWeight(FORMAT_FP8, stack("weight"), None, stack("weight_scale"), n, k)
    return KernelWeight(FORMAT_BF16, stack("weight") if stacked_bf16 is None else stacked_bf16, None, None, n, k)


def stack_experts(moe: nn.Module) -> ExpertWeights:
    """A `LatentMoE`'s experts as the GPU kernels read them (see the module docstring for memory and staleness).

    Quantized projections are stacked buffer by buffer. When every projection is bfloat16, the model's own stacked
    weights are used (a second stacking would re-point the parameters away from them, and the model's grouped
    product would then stack them again on its next call); a bfloat16 projection beside quantized ones (which the
    model never stacks) is stacked here.
    """
    ups = [e.up_proj for e in moe.experts]
    downs = [e.down_proj for e in moe.experts]
    plain = not any(isinstance(p, (NVFP4Linear, FP8Linear)) for p in ups + downs)
    up_bf16, down_bf16 = moe._stacked_weights() if plain else (None, None)
    return ExpertWeights(_stacked_projection(moe, "up", ups, up_bf16),
                         _stacked_projection(moe, "down", downs, down_bf16))

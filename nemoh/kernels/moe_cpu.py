"""A LatentMoE's routed experts on the native CPU kernel (`nemoh_experts`, cpu/moe.cpp), eagerly.

`native_experts(moe, u, weights, ids)` computes what `LatentMoE._sorted_experts` computes (the reference):
every row's weighted sum over its top-k experts' relu2 MLPs, grouping the (row, expert) pairs by expert and
reading only the chosen experts' weights, in their stored format (bfloat16, FP8, NVFP4 ...) re-laid in panels
(`linear_cpu.panel_descriptor`, kept on each expert module and shared with the captured steps' plans). No host
synchronisation, no per-expert Python: one native call whatever the number of tokens.
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn

from nemoh.kernels import cpu_library as C
from nemoh.kernels.linear_cpu import panel_descriptor


def expert_descriptors(moe: nn.Module, lib: C.CpuLibrary) -> tuple[ctypes.Array, ctypes.Array]:
    """(up, down) descriptor arrays of every expert, in the panel layout, cached on the MoE module."""
    cached = getattr(moe, "_nemoh_expert_arrays", None)
    ups = [panel_descriptor(e.up_proj, None, lib) for e in moe.experts]
    downs = [panel_descriptor(e.down_proj, None, lib) for e in moe.experts]
    key = tuple((u.data, d.data) for u, d in zip(ups, downs))
    if cached is None or cached[0] != key:
        cached = (key, (C.Weight * len(ups))(*ups), (C.Weight * len(downs))(*downs))
        moe._nemoh_expert_arrays = cached
    return cached[1], cached[2]


def native_experts(moe: nn.Module, u: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                   lib: C.CpuLibrary) -> torch.Tensor:
    """u (n, width), weights (n, k) float32, ids (n, k) -> (n, width) in u's dtype."""
    n, k = ids.shape
    width = u.shape[1]
    ups, downs = expert_descriptors(moe, lib)
    u32 = u.float().contiguous()
    ids32 = ids.to(torch.int32).contiguous()
    w32 = weights.float().contiguous()
    out = torch.empty(n, width, dtype=torch.float32)
    args = C.ExpertsArgs(shape=None, rows=n, u=u32.data_ptr(), u_stride=width, ids=ids32.data_ptr(),
                         weights=w32.data_ptr(), top_k=k, up=ctypes.addressof(ups), down=ctypes.addressof(downs),
                         num_experts=len(moe.experts), out=out.data_ptr(), out_stride=width,
                         round=C.ROUNDING[u.dtype])
    lib.call("nemoh_experts", args)
    return out.to(u.dtype)

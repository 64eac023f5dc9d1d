"""Which product an NVFP4 / FP8 weight-only Linear uses, by device and batch size (the packed weight is never
dequantised whole in inference):

- CUDA with Triton: `quant_linear_triton.quant_linear` (weights decoded in registers, tensor-core products);
- CPU with the native kernels: the native panel product (`linear_cpu.panel_linear`): the packed codes and scales
  re-laid once in panels of 16 features and decoded in registers, every row of x sharing each decode;
- CPU without them: the weight dequantised TILE_ELEMENTS at a time (a cache-sized block of output features) into
  PyTorch's own product, so the dequantised copy never leaves the cache;
- anything else: None, and the module dequantises the whole weight (the reference).
Reference for all: dequantise with nemoh.quant, then multiply (tests/kernels, tests/quant).
"""
from __future__ import annotations

import torch
from torch import nn

from nemoh.kernels import cpu_library
from nemoh.kernels.triton_support import HAVE_TRITON

TILE_ELEMENTS = 1 << 18      # 256k weights: 1 MiB in float32, half in bfloat16 (the L2 cache of this CPU's cores)


def packed_product(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """module(x) through a product that reads the packed weight, or None when none applies here."""
    if x.is_cuda:
        if not HAVE_TRITON or x.dtype != torch.bfloat16:
            return None
        from nemoh.kernels.quant_linear_triton import linear

        return linear(x, module)
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    lib = cpu_library.library()
    if lib is not None:
        from nemoh.kernels.linear_cpu import panel_linear

        return panel_linear(x, module, lib)
    return tiled_product(module, x.reshape(-1, module.in_features)).view(*x.shape[:-1], module.out_features)


def tiled_product(module: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """rows (m, in) @ W^T with W dequantised one tile of output features at a time: (m, out) in rows' dtype."""
    out = rows.new_empty(rows.shape[0], module.out_features)
    step = max(16, TILE_ELEMENTS // module.in_features)
    for start in range(0, module.out_features, step):
        stop = min(module.out_features, start + step)
        out[:, start:stop] = rows @ module.dequantized_rows(start, stop, rows.dtype).t()
    return out

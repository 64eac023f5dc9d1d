"""Which product an NVFP4 / FP8 weight-only Linear uses, by device and batch size (the packed weight is never
dequantised whole in inference):

- CUDA with Triton: `quant_linear_triton.quant_linear` (weights decoded in registers, tensor-core products);
- CPU with the native kernels, up to NATIVE_MAX_ROWS rows (decode, verification, small chunks): the native
  product, which reads the packed weight and scales directly (`linear_cpu.linear`);
- CPU, more rows (prefill): the weight dequantised TILE_ELEMENTS at a time (a cache-sized block of output
  features) into PyTorch's own product, so the dequantised copy never leaves the cache;
- anything else: None, and the module dequantises the whole weight (the reference).
Reference for all: dequantise with nemoh.quant, then multiply (tests/kernels, tests/quant).
"""
from __future__ import annotations

import torch
from torch import nn

from nemoh.kernels import cpu_library
from nemoh.kernels.triton_support import HAVE_TRITON

# From this many rows the tiled PyTorch product beats the native one on this project's 2-core CPU
# (`python benchmarks/quant_matmul.py`): PyTorch's product is faster than nemoh's few-row kernel once the rows
# amortise decoding the tile.
NATIVE_MAX_ROWS = 64
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
    rows = x.reshape(-1, module.in_features)
    if rows.shape[0] <= NATIVE_MAX_ROWS:
        lib = cpu_library.library()
        if lib is None:
            return None
        from nemoh.kernels.linear_cpu import linear

        out = linear(rows.float().contiguous(), module, round=cpu_library.ROUNDING[x.dtype], lib=lib)
        return out.to(x.dtype).view(*x.shape[:-1], module.out_features)
    return tiled_product(module, rows).view(*x.shape[:-1], module.out_features)


def tiled_product(module: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """rows (m, in) @ W^T with W dequantised one tile of output features at a time: (m, out) in rows' dtype."""
    out = rows.new_empty(rows.shape[0], module.out_features)
    step = max(16, TILE_ELEMENTS // module.in_features)
    for start in range(0, module.out_features, step):
        stop = min(module.out_features, start + step)
        torch.matmul(rows, module.dequantized_rows(start, stop, rows.dtype).t(), out=out[:, start:stop])
    return out

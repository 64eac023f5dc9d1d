"""Dense and quantized linear products on the native CPU kernels: y = x @ W^T read from the stored format.

`weight_descriptor(module)` describes a `Linear` (float32 / bfloat16 / float16 weight), `NVFP4Linear` or
`FP8Linear` to the kernels without copying anything: the packed NVFP4 codes and their scales, the FP8 bytes,
the bfloat16 weight are read where they lie. `linear(x, module)` runs one product eagerly (the quantized
modules' small-batch forward); captured steps put the same descriptor in their plans.

Reference: `nemoh.kernels.reference.linear` (dequantise to float32, then multiply); `tests/kernels` checks
that the two agree to float32 rounding for every format and for shapes that are not multiples of the vector
width or of the 16-value scale block.
"""
from __future__ import annotations

import torch
from torch import nn

from nemoh.kernels import cpu_library as C
from nemoh.quant.linear import FP8Linear, NVFP4Linear


def weight_descriptor(module: nn.Module, weight: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, own_bias: bool = True) -> C.Weight:
    """The kernels' view of a linear module's weight (or of an explicit `weight` / `bias` pair; with own_bias
    False, no bias at all). The caller keeps the module alive; a bias must be float32."""
    if isinstance(module, NVFP4Linear):
        w = module.weight
        return C.Weight(format=C.FORMAT_NVFP4, n=module.out_features, k=module.in_features, data=w.data_ptr(),
                        block_scale=module.weight_scale.data_ptr(), scale=float(module.weight_scale_2),
                        bias=None)
    if isinstance(module, FP8Linear):
        return C.Weight(format=C.FORMAT_FP8, n=module.out_features, k=module.in_features,
                        data=module.weight.data_ptr(), block_scale=None, scale=float(module.weight_scale),
                        bias=None)
    weight = module.weight if weight is None else weight
    if bias is None and weight is module.weight and own_bias:
        bias = getattr(module, "bias", None)
    if weight.dim() != 2 or not weight.is_contiguous() or weight.dtype not in C.DTYPE_FORMATS:
        raise ValueError(f"no native product for a weight {weight.dtype} {tuple(weight.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        raise ValueError("the native product takes a contiguous float32 bias (see float_bias)")
    return C.Weight(format=C.DTYPE_FORMATS[weight.dtype], n=weight.shape[0], k=weight.shape[1],
                    data=weight.data_ptr(), block_scale=None, scale=1.0, bias=C.ptr(bias))


class Panels:
    """Weights re-laid in the kernels' panel layout (`CpuLibrary.pack_panels`): one copy per weight, made on first
    request and kept on the module (so an engine's plans and the eager products share it); batched products read
    them with no transposition at run time. A replaced or moved weight gets a new copy."""

    def __init__(self, lib: C.CpuLibrary):
        self.lib = lib
        self.modules: list[nn.Module] = []

    def descriptor(self, module: nn.Module, bias: torch.Tensor | None = None) -> C.Weight:
        return panel_descriptor(module, bias, self.lib, self.modules)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for m in self.modules for t in m._nemoh_panels[2])


def panel_descriptor(module: nn.Module, bias: torch.Tensor | None, lib: C.CpuLibrary,
                     made: list | None = None) -> C.Weight:
    """The module's weight in the panel layout (packed on first use, kept as `module._nemoh_panels`)."""
    plain = weight_descriptor(module, own_bias=False)
    key = (plain.format, plain.n, plain.k, plain.data, plain.block_scale)
    cached = getattr(module, "_nemoh_panels", None)
    if cached is None or cached[0] != key:
        packed, tensors = lib.pack_panels(plain)
        cached = (key, packed, tensors)
        module._nemoh_panels = cached
    if made is not None and module not in made:
        made.append(module)
    out = C.Weight.from_buffer_copy(cached[1])       # the bias is the caller's (a float32 copy it keeps)
    out.bias = C.ptr(bias)
    return out


def panel_linear(x: torch.Tensor, module: nn.Module, lib: C.CpuLibrary) -> torch.Tensor:
    """module(x) on the native panel product: x (..., in) float32 / bfloat16 / float16 -> (..., out) in x's dtype,
    each output rounded as that dtype stores it (the module's bias, if any, in float32)."""
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias = bias.detach().float().contiguous()      # kept alive here: the descriptor holds only its address
    w = panel_descriptor(module, bias, lib)
    rows = x.reshape(-1, w.k)
    x32 = rows.float().contiguous()
    out = torch.empty(x32.shape[0], w.n, dtype=torch.float32)
    args = C.LinearArgs(shape=None, rows=x32.shape[0], x=x32.data_ptr(), x_stride=w.k, y=out.data_ptr(),
                        y_stride=w.n, w=w, epilogue=C.STORE, round=C.ROUNDING[x.dtype])
    lib.call("nemoh_linear", args)
    return out.to(x.dtype).view(*x.shape[:-1], w.n)


def supports(module: nn.Module) -> bool:
    """Whether the native kernels multiply by this module's weight as stored."""
    if isinstance(module, (NVFP4Linear, FP8Linear)):
        return True
    w = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) and w is not None and w.dim() == 2 and w.dtype in C.DTYPE_FORMATS
            and (module.bias is None or module.bias.dtype == torch.float32))


def linear(x: torch.Tensor, module: nn.Module, out: torch.Tensor | None = None, epilogue: int = C.STORE,
           round: int = C.ROUND_NONE, lib: C.CpuLibrary | None = None) -> torch.Tensor:
    """x: (m, in) float32 contiguous -> (m, out) float32 (written into `out` when given)."""
    lib = lib or C.library()
    w = weight_descriptor(module)
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, w.n, dtype=torch.float32)
    args = C.LinearArgs(shape=None, rows=m, x=x.data_ptr(), x_stride=x.stride(0), y=out.data_ptr(),
                        y_stride=out.stride(0), w=w, epilogue=epilogue, round=round)
    lib.call("nemoh_linear", args)
    return out

"""Dense linear layers that, for CPU inference, multiply by a copy of the weight pre-packed by oneDNN.

On this project's 2-core CPU, `F.linear` reads a decode step's weights at 7-12 GB/s, while oneDNN's
product against a weight reordered once into its own blocked layout reads 10-21 GB/s: in float32 1.2-2.3x
faster for one row, 1.3-2.7x for the 4 rows of a speculative verification, 1.05-2.8x for a 32-sequence
decode batch; in bfloat16 0.9-1.8x, 1.4-2.2x and 1.25-2.0x; a 1024-row prefill chunk 0.94-1.5x
(`python benchmarks/cpu_linear.py`, cold weights). The operator is the one PyTorch's own compiler emits
for CPU linears when it freezes weights (`torch.ops.mkldnn._linear_pointwise`).

The packed copy is made on first use and remade whenever the weight changes (a new tensor, or an in-place
write: `Tensor._version`, which tensors made under `torch.inference_mode` lack), so loading, quantizing or
moving the model needs no extra step. It costs one more copy of each weight of PACK_MIN_ELEMENTS and more in
memory, which the engine counts before it sizes its caches (`EngineArgs.cpu_packed_weights` turns packing
off). Training (autograd on), other devices and dtypes, or a PyTorch built without oneDNN take `F.linear`
unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemoh.kernels import cpu_library


def _packing_available() -> set[torch.dtype]:
    """The dtypes oneDNN multiplies well on this CPU (bfloat16 only where the CPU has bfloat16 arithmetic:
    without it oneDNN emulates and is slower than `F.linear`)."""
    ops = getattr(torch.ops, "mkldnn", None)
    if not torch.backends.mkldnn.is_available() or not hasattr(ops, "_linear_pointwise"):
        return set()
    dtypes = {torch.float32}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.add(torch.bfloat16)
    return dtypes


PACKED_DTYPES = _packing_available()
# A oneDNN call costs about 20 us before any arithmetic, against 4-36 us for `F.linear` with a small weight
# that is still in cache: there the packed product is slower (0.2-0.9x in float32 for 1 and 4 rows, the
# demo model's smallest shapes, `python benchmarks/cpu_linear.py --hot`), so weights under this size keep
# `F.linear`. From 131072 elements (0.5 MiB in float32, 0.25 MiB in bfloat16) it pays for weights that come
# from memory, as in any model larger than the cache: engine_vs_hf's experts and latent projections, 512 x 256,
# 1.49x for one row in float32 and 1.66x in bfloat16, cold; in the engine, single-stream bfloat16 decode on
# engine_vs_hf's checkpoint 61.6 / 54.1 / 52.2 tok/s against 57.8 / 53.4 / 46.9 with the bfloat16 experts
# left out (a 0.5 MiB threshold), alternating runs.
PACK_MIN_ELEMENTS = 1 << 17


class PackedWeight:
    """One weight's packed copy, keyed by what identifies its current contents."""

    __slots__ = ("key", "packed", "enabled")

    def __init__(self):
        self.key: tuple | None = None
        self.packed: torch.Tensor | None = None
        self.enabled = True

    def __reduce__(self):
        # a copied or pickled module starts without the copy (an opaque oneDNN tensor cannot be copied)
        return PackedWeight, ()

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # under autocast `F.linear` casts as autocast asks; the oneDNN op would silently stay in the weight's
        # dtype and hand float32 to layers that autocast gives bfloat16 (the trainer's `--eval` crashed so)
        # a compiled graph does its own products (the packed copy's bookkeeping is not traceable)
        if (torch.compiler.is_compiling() or not self.enabled or torch.is_grad_enabled() or x.dtype is not weight.dtype
                or not packable(weight) or torch.is_autocast_enabled(x.device.type)):
            return F.linear(x, weight, bias)
        # tensors made under inference_mode keep no version counter (and are seldom written in place)
        version = -1 if weight.is_inference() else weight._version
        key = (weight.data_ptr(), version, weight.shape, weight.stride(), weight.dtype)
        if key != self.key:
            self.packed = None          # the old copy goes before the new one is made, not after
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
            self.key = key
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def packable(weight: torch.Tensor) -> bool:
    """Whether CPU inference makes a packed copy of this weight (its device, dtype, rank and size)."""
    return (weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES and weight.dim() == 2
            and weight.numel() >= PACK_MIN_ELEMENTS)


def packed_copies(model: nn.Module) -> list[PackedWeight]:
    """Every PackedWeight a model's modules hold (each `Linear`'s, and the fused ones layers keep)."""
    return [v for m in model.modules() for v in vars(m).values() if isinstance(v, PackedWeight)]


def set_packing(model: nn.Module, enabled: bool) -> None:
    """Switch a model's packed products on or off; off also frees the copies already made."""
    for packed in packed_copies(model):
        packed.enabled = enabled
        if not enabled:
            packed.key = packed.packed = None


def packed_bytes_estimate(model: nn.Module) -> int:
    """The memory the packed copies of a model's dense weights will take, about (one copy of each weight
    that `packable` accepts; q/k/v counted apart, as their fused copy holds the same bytes)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if isinstance(m, Linear) and m.packed_weight.enabled and packable(m.weight))


class Linear(nn.Linear):
    """`nn.Linear` with the packed CPU inference products; the same parameters, state dict and training.

    bfloat16 / float16 weights on a CPU multiply through nemoh's native panel product (nemoh.kernels.linear_cpu),
    which reads them converted in registers: PyTorch's own product in these dtypes is 3-5x slower than in
    float32 on a CPU without bfloat16 arithmetic (a 512-token prefill of `benchmarks/engine_vs_llamacpp.py`'s
    47M model). float32 keeps oneDNN's packed product."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.packed_weight = PackedWeight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _native_panels(x, self.weight):
            from nemoh.kernels.linear_cpu import panel_linear

            return panel_linear(x, self, cpu_library.library())
        return self.packed_weight.linear(x, self.weight, self.bias)


def _native_panels(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether an inference product with this bfloat16 / float16 weight goes to the native panel kernels."""
    return (weight.dtype in (torch.bfloat16, torch.float16) and x.dtype is weight.dtype
            and x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu") and cpu_library.library() is not None)

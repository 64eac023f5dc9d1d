"""Quantized Linear modules (weight-only: packed weights stay resident, dequantised per forward).

Loader contract. A quantized module registers buffers under the checkpoint's own tensor names,
shapes and dtypes, so `<module>.<tensor>` in the checkpoint maps onto a buffer by name:

  NVFP4Linear: weight uint8 (out, in/2), weight_scale float8_e4m3fn (out, in/16),
               weight_scale_2 float32 ()
  FP8Linear:   weight float8_e4m3fn (out, in), weight_scale float32 ()
  both:        input_scale float32 () -- only when the checkpoint has one (`has_input_scale`):
               ModelOpt writes it for quant_algo NVFP4 (W4A4) and FP8 (W8A8), not for
               W4A16_NVFP4. apply_quantization decides from the config; without it the buffer is
               None (not in named_buffers) and `load_tensor` still accepts one. nemoh never uses
               it (weight-only), it is kept so the checkpoint loads and round-trips exactly.

ModelOpt writes the scalars with shape () (its per-tensor amax is a 0-d tensor; vLLM's loaders note
"checkpoint stores a scalar"); some tools write (1,). `load_tensor(name, tensor)` accepts both,
checks shape and dtype against `expected_tensors()`, and raises ValueError with the module's
`TENSOR_RULES[name]` on a mismatch. Buffers built on the meta device are replaced, not copied into.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from nemoh.quant.fp8 import FP8_DTYPE, dequantize_fp8
from nemoh.quant.modelopt import QuantConfig, strip_root
from nemoh.quant.nvfp4 import NVFP4_GROUP_SIZE, dequantize_nvfp4

logger = logging.getLogger(__name__)

_SCALAR_RULE = "float32 scalar, shape () (shape (1,) is accepted)"


class _QuantLinearBase(nn.Module):
    TENSOR_RULES: dict[str, str] = {}
    scheme: str = ""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, has_input_scale: bool, device: torch.device | str | None
    ) -> None:
        super().__init__()
        if bias:
            raise ValueError(f"{type(self).__name__}: bias is not supported (NemotronH projections have none)")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "input_scale", torch.ones((), dtype=torch.float32, device=device) if has_input_scale else None
        )

    def expected_tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def load_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Check `tensor` against this module's rule for `name` and store it."""
        expected = self.expected_tensors()
        if name not in expected:
            raise ValueError(
                f"unexpected tensor {name!r} for {type(self).__name__} (expects {', '.join(expected)})"
            )
        shape, dtype = expected[name]
        if shape == () and tuple(tensor.shape) == (1,):
            tensor = tensor.reshape(())
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}; "
                f"rule: {self.TENSOR_RULES[name]}"
            )
        current = getattr(self, name)
        if current is None or current.is_meta or current.device != tensor.device:
            self._buffers[name] = tensor
        else:
            current.copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features), from the packed weight as stored: on a GPU a Triton
        product, on a CPU the native product (a few rows) or cache-sized tiles dequantised into the product (a
        prefill's many rows); the whole weight dequantised to x.dtype where neither is available, under autograd
        and in a graph torch.compile traces (the reference)."""
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            from nemoh.kernels.quant_dispatch import packed_product

            out = packed_product(self, x)
            if out is not None:
                return out
        return F.linear(x, self.dequantized_weight(x.dtype))

    def dequantized_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows start .. stop - 1 of the dequantised weight (out_features rows), in `dtype`."""
        raise NotImplementedError

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


class NVFP4Linear(_QuantLinearBase):
    """Linear with an NVFP4 weight (4.5 bits per weight resident)."""

    scheme = "nvfp4"
    TENSOR_RULES = {
        "weight": "NVFP4 weight is uint8 [out, in/2]: two E2M1 codes per byte, element 2i in the low nibble",
        "weight_scale": "NVFP4 weight_scale is float8_e4m3fn [out, in/16]: one scale per 16 inputs",
        "weight_scale_2": f"NVFP4 weight_scale_2 is the per-tensor scale amax/(6*448), {_SCALAR_RULE}",
        "input_scale": f"input_scale is the activation scale amax/(6*448), {_SCALAR_RULE}",
    }

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        has_input_scale: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, has_input_scale, device)
        if in_features % NVFP4_GROUP_SIZE:
            raise ValueError(
                f"NVFP4Linear: in_features {in_features} is not a multiple of {NVFP4_GROUP_SIZE} "
                "(one FP8 scale per 16 inputs)"
            )
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "weight_scale",
            torch.zeros(out_features, in_features // NVFP4_GROUP_SIZE, dtype=torch.uint8, device=device).view(FP8_DTYPE),
        )
        self.register_buffer("weight_scale_2", torch.ones((), dtype=torch.float32, device=device))

    def expected_tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {
            "weight": ((self.out_features, self.in_features // 2), torch.uint8),
            "weight_scale": ((self.out_features, self.in_features // NVFP4_GROUP_SIZE), FP8_DTYPE),
            "weight_scale_2": ((), torch.float32),
            "input_scale": ((), torch.float32),
        }

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_nvfp4(self.weight, self.weight_scale, self.weight_scale_2, dtype)

    def dequantized_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_nvfp4(self.weight[start:stop], self.weight_scale[start:stop], self.weight_scale_2, dtype)


class FP8Linear(_QuantLinearBase):
    """Linear with a per-tensor FP8 E4M3 weight (1 byte per weight resident)."""

    scheme = "fp8"
    TENSOR_RULES = {
        "weight": "FP8 weight is float8_e4m3fn [out, in]",
        "weight_scale": f"FP8 weight_scale is the per-tensor scale amax/448, {_SCALAR_RULE}",
        "input_scale": f"input_scale is the activation scale amax/448, {_SCALAR_RULE}",
    }

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        has_input_scale: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, has_input_scale, device)
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device).view(FP8_DTYPE)
        )
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))

    def expected_tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {
            "weight": ((self.out_features, self.in_features), FP8_DTYPE),
            "weight_scale": ((), torch.float32),
            "input_scale": ((), torch.float32),
        }

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale, dtype)

    def dequantized_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8(self.weight[start:stop], self.weight_scale, dtype)


QUANT_LINEAR_CLASSES: dict[str, type[_QuantLinearBase]] = {"nvfp4": NVFP4Linear, "fp8": FP8Linear}


def apply_quantization(model: nn.Module, qcfg: QuantConfig | None) -> int:
    """Replace every nn.Linear the config declares quantized by its quantized module, in place.

    The replacement keeps the module name (so checkpoint keys map onto its buffers) and the device
    of the replaced weight (meta stays meta). Only nn.Linear is ever replaced: conv1d, norms, A_log,
    embeddings are never quantized. Returns the number of modules replaced.
    """
    if qcfg is None:
        return 0
    replaced = 0
    seen: set[str] = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        seen.add(name)
        scheme = qcfg.scheme_for(name)
        if scheme is None:
            continue
        if module.bias is not None:
            raise ValueError(f"{name}: quantized Linear with a bias is not supported")
        new = QUANT_LINEAR_CLASSES[scheme](
            module.in_features, module.out_features,
            has_input_scale=qcfg.has_input_scale(name), device=module.weight.device,
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced += 1
    if qcfg.quant_algo == "MIXED_PRECISION":
        listed = {strip_root(n) for n in qcfg.layer_names()}
        present = {strip_root(n) for n in seen}
        missing = sorted(listed - present)
        if missing:
            logger.warning(
                "%d quantized_layers entries name no nn.Linear in the model (first: %s)",
                len(missing), ", ".join(missing[:5]),
            )
    return replaced

"""FP8 E4M3 (float8_e4m3fn): per-tensor weight quantization and FP8 KV-cache helpers.

ModelOpt's FP8 Linear (REFERENCE.md §4): `weight` float8_e4m3fn (out, in), `weight_scale` float32
scalar = amax(W) / 448, optional `input_scale` float32 scalar = activation amax / 448.
W ≈ float(weight) * weight_scale.

Casting rounds to nearest (ties to even) and saturates: values beyond ±448 become ±448 (clamped
here explicitly rather than relying on the cast's out-of-range behaviour, which differs between
torch versions and hardware).
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def to_float8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest FP8 E4M3 value, saturating at ±448 (NaN stays NaN)."""
    return x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)


def fp8_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """Per-tensor scale amax / 448 as a float32 scalar of shape (); a zero amax gives 1.0."""
    amax = torch.as_tensor(amax, dtype=torch.float32).reshape(())
    if not torch.isfinite(amax):
        raise ValueError(f"FP8 amax must be finite, got {amax.item()}")
    return torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8: returns (weight float8_e4m3fn, same shape; weight_scale float32 ())."""
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError(f"quantize_fp8: weight {tuple(weight.shape)} contains inf or NaN")
    scale = fp8_scale_from_amax(w.abs().amax())
    return to_float8_e4m3(w / scale), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """FP8 values times a per-tensor scale, computed in float32, cast to `dtype`. Stacked weights (*batch,
    out, in) may come with one scale per batch entry, `scale` of shape (*batch,)."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=q.device)
    scale = scale.reshape(()) if scale.numel() == 1 else scale[..., None, None]
    return (q.float() * scale).to(dtype)


# --- FP8 KV cache ------------------------------------------------------------------------------
# Checkpoints with kv_cache_quant_algo "FP8" carry `k_proj.k_scale` / `v_proj.v_scale` (amax/448);
# without them a scale of 1.0 is the usual default.


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """K or V values -> float8_e4m3fn with a per-tensor scale (x ≈ fp8 * scale)."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return to_float8_e4m3(x.float() / scale)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """float8_e4m3fn K or V -> `dtype`."""
    return dequantize_fp8(q, scale, dtype)

"""NVFP4: 4-bit E2M1 weights with an FP8 E4M3 scale per 16 inputs and an FP32 scale per tensor.

Layout as NVIDIA ModelOpt exports it (REFERENCE.md §4), for a Linear weight W: (out, in):
  weight          uint8          (out, in/2)   two E2M1 codes per byte, element 2i in the low nibble
  weight_scale    float8_e4m3fn  (out, in/16)  one scale per block of 16 inputs
  weight_scale_2  float32        ()            per-tensor scale, amax(W) / (6 * 448)

  W[o, i] = e2m1(code[o, i]) * (float(weight_scale[o, i // 16]) * weight_scale_2)

The product order above (block scale times tensor scale first, then the E2M1 value) is the order
ModelOpt's own dequantiser uses; all arithmetic is float32 and the result is cast to the requested
dtype once at the end.

E2M1 code: bit 3 = sign, bits 0-2 index the magnitudes [0, 0.5, 1, 1.5, 2, 3, 4, 6].
Rounding (ModelOpt `NVFP4QTensor._cast_fp4`): round to the nearest magnitude, a tie goes to the
even code, i.e. IEEE round-half-to-even on the E2M1 grid: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4; anything above 6 saturates to 6. The sign bit is set for
every negative input, including ones that round to zero (code 8, "-0").
"""

from __future__ import annotations

import torch

from nemoh.quant.fp8 import FP8_E4M3_MAX, to_float8_e4m3

NVFP4_GROUP_SIZE = 16
E2M1_MAX = 6.0
# The eight non-negative magnitudes, indexed by the low three bits of a code.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between consecutive magnitudes; a value equal to one is a tie.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
# Smallest positive FP8 E4M3 subnormal: block scales are clamped up to it so a block with a tiny
# (non-zero) amax does not get a zero scale (as ModelOpt does).
_FP8_MIN_SUBNORMAL = 2.0**-9

# On the CPU explicitly: this module is first imported while the loader builds the model under
# `torch.device("meta")`, which would make meta tensors of these tables (and import torch._dynamo to do it).
_E2M1_TABLE = torch.tensor(list(E2M1_MAGNITUDES) + [-m for m in E2M1_MAGNITUDES], dtype=torch.float32,
                           device="cpu")
# Byte -> (value of low nibble, value of high nibble): one gather decodes two weights.
_BYTE_TABLE = torch.stack(
    [_E2M1_TABLE[torch.arange(256, device="cpu") & 0x0F], _E2M1_TABLE[torch.arange(256, device="cpu") >> 4]],
    dim=-1,
)  # (256, 2) float32
_DEQUANT_CHUNK_ELEMENTS = 1 << 20
_tables_on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device not in _tables_on_device:
        _tables_on_device[device] = (_E2M1_TABLE.to(device), _BYTE_TABLE.to(device))
    return _tables_on_device[device]


# --- codes -------------------------------------------------------------------------------------


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round `x` (already divided by its scales) to E2M1 codes. Returns uint8 codes in [0, 15].

    Round-to-nearest with ties to the even code (see the module docstring); |x| > 6 saturates.
    """
    a = x.float().abs()
    midpoints = torch.tensor(_E2M1_MIDPOINTS, device=x.device)
    # searchsorted(left): index i with midpoints[i-1] < a <= midpoints[i], so a tie rounds down...
    mag = torch.searchsorted(midpoints, a)
    # ...except at midpoints with an odd lower code (0.75, 1.75, 3.5), where down would be odd.
    tie_up = (a == 0.75) | (a == 1.75) | (a == 3.5)
    mag = (mag + tie_up.to(mag.dtype)).to(torch.uint8)
    sign = (x < 0).to(torch.uint8) << 3
    return sign | mag


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (any integer dtype, values 0-15) -> float32 values."""
    table, _ = _tables(codes.device)
    return table[codes.long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """(..., n) codes -> (..., n/2) uint8; element 2i goes to the low nibble, 2i+1 to the high one."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_e2m1 needs an even last dimension, got {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """(..., n/2) uint8 -> (..., n) uint8 codes (inverse of `pack_e2m1`)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


# --- tensors -----------------------------------------------------------------------------------


def quantize_nvfp4(
    weight: torch.Tensor, group_size: int = NVFP4_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a weight (out, in) to NVFP4 as ModelOpt does (REFERENCE.md §4).

    Returns (packed uint8 (out, in/2), weight_scale float8_e4m3fn (out, in/16),
    weight_scale_2 float32 scalar of shape ()).

    1. weight_scale_2 = amax(W) / (6 * 448)      (an all-zero W gets 1.0)
    2. per block of 16: scale = fp8_e4m3(amax_block / (6 * weight_scale_2)); an all-zero block
       gets scale 1.0, a tiny one is clamped up to the smallest FP8 subnormal 2^-9.
    3. codes = E2M1 round-to-nearest-even of W / (float(scale) * weight_scale_2), packed.
    """
    if group_size != NVFP4_GROUP_SIZE:
        raise ValueError(f"NVFP4 group_size must be {NVFP4_GROUP_SIZE} (one FP8 scale per 16 inputs), got {group_size}")
    if weight.dim() < 2:
        raise ValueError(f"quantize_nvfp4 expects a weight (out, in), got shape {tuple(weight.shape)}")
    in_features = weight.shape[-1]
    if in_features % group_size:
        raise ValueError(
            f"NVFP4 needs the input dimension to be a multiple of {group_size}: weight {tuple(weight.shape)} "
            f"has in={in_features}; keep this module in BF16 (add it to the exclude list)"
        )
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError(f"quantize_nvfp4: weight {tuple(weight.shape)} contains inf or NaN")

    # 1. per-tensor scale
    amax = w.abs().amax()
    scale_2 = amax / (E2M1_MAX * FP8_E4M3_MAX) if amax > 0 else torch.ones((), dtype=torch.float32)
    scale_2 = scale_2.to(torch.float32).reshape(())

    # 2. per-block FP8 scales
    blocks = w.reshape(*w.shape[:-1], in_features // group_size, group_size)
    block_amax = blocks.abs().amax(dim=-1)
    block_scale = block_amax / (E2M1_MAX * scale_2)
    block_scale = torch.where(block_scale == 0, torch.ones_like(block_scale), block_scale)
    weight_scale = to_float8_e4m3(block_scale.clamp(min=_FP8_MIN_SUBNORMAL))

    # 3. codes
    scaled = blocks / (weight_scale.float() * scale_2).unsqueeze(-1)
    codes = encode_e2m1(scaled.reshape(w.shape))
    return pack_e2m1(codes), weight_scale, scale_2


def dequantize_nvfp4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    scale_2: torch.Tensor | float,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """NVFP4 (packed uint8 (out, in/2), fp8 scale (out, in/16), fp32 scalar) -> weight (out, in) in `dtype`.

    One table gather decodes each byte into its two values and the per-block scale (already multiplied
    by the tensor scale) is broadcast over the 16 inputs of its block; the only Python loop is over
    row chunks of about a million weights. Leading batch dims (e.g. stacked experts) are allowed, with one
    tensor scale per batch entry when `scale_2` has those dims (shape (*batch,)).
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"NVFP4 weight must be uint8 (out, in/2), got {packed.dtype}")
    half_in = packed.shape[-1]
    num_blocks = scale.shape[-1]
    if half_in * 2 != num_blocks * NVFP4_GROUP_SIZE or scale.shape[:-1] != packed.shape[:-1]:
        raise ValueError(
            f"NVFP4 shapes disagree: weight {tuple(packed.shape)} (out, in/2) vs weight_scale "
            f"{tuple(scale.shape)} (out, in/16)"
        )
    _, byte_table = _tables(packed.device)
    scale_2 = torch.as_tensor(scale_2, dtype=torch.float32, device=scale.device)
    block_scale = scale.float() * (scale_2.reshape(()) if scale_2.numel() == 1 else scale_2[..., None, None])
    in_features = half_in * 2
    rows_packed = packed.reshape(-1, half_in)
    rows_scale = block_scale.reshape(-1, num_blocks)
    out = torch.empty(rows_packed.shape[0], in_features, dtype=dtype, device=packed.device)
    # Row chunks of ~1M weights keep the float32 temporary in cache (about 1.5x faster on CPU).
    chunk = max(1, _DEQUANT_CHUNK_ELEMENTS // in_features)
    for start in range(0, rows_packed.shape[0], chunk):
        codes = rows_packed[start : start + chunk].reshape(-1).to(torch.int32)
        values = torch.index_select(byte_table, 0, codes).view(-1, num_blocks, NVFP4_GROUP_SIZE)
        values.mul_(rows_scale[start : start + chunk].unsqueeze(-1))
        out[start : start + chunk] = values.view(-1, in_features)
    return out.view(*packed.shape[:-1], in_features)


def nvfp4_nbytes(out_features: int, in_features: int) -> int:
    """Bytes of one NVFP4 Linear's tensors (codes + block scales + two scalars)."""
    return out_features * in_features // 2 + out_features * in_features // NVFP4_GROUP_SIZE + 8

"""NVFP4 codes, rounding, packing and tensor (de)quantisation against a scalar reference."""

import struct

import pytest
import torch

from nemoh.quant.nvfp4 import (
    decode_e2m1,
    dequantize_nvfp4,
    encode_e2m1,
    pack_e2m1,
    quantize_nvfp4,
    unpack_e2m1,
)

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def reference_dequantize(packed, scale, scale_2):
    """Scalar loops, written from REFERENCE.md §4 alone: W[o,i] = e2m1(code) * (fp8 scale * scale_2)."""
    out_f, half = packed.shape
    s2 = float(scale_2)
    rows = []
    for o in range(out_f):
        row = []
        for i in range(half * 2):
            byte = int(packed[o, i // 2])
            code = byte & 0xF if i % 2 == 0 else byte >> 4
            mag = GRID[code & 7]
            val = -mag if code & 8 else mag
            block = _f32(float(scale[o, i // 16].float()) * s2)  # float32 product, as nemoh/ModelOpt
            row.append(_f32(val * block))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def test_all_16_codes_round_trip():
    codes = torch.arange(16, dtype=torch.uint8)
    values = decode_e2m1(codes)
    assert values[:8].tolist() == GRID
    assert values[8:].tolist() == [-v for v in GRID]
    # every value except -0 encodes back to its own code; -0.0 is not < 0 so it encodes as +0
    back = encode_e2m1(values)
    assert back[1:8].tolist() == list(range(1, 8))
    assert back[9:].tolist() == list(range(9, 16))
    assert back[0] == 0 and back[8] == 0


def test_round_to_nearest_ties_to_even_code():
    # ModelOpt NVFP4QTensor._cast_fp4: searchsorted on the midpoints, ties at 0.75/1.75/3.5 go up,
    # i.e. every tie lands on the even code.
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert decode_e2m1(encode_e2m1(ties)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert (encode_e2m1(ties) % 2 == 0).all()
    assert decode_e2m1(encode_e2m1(-ties)).tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    near = torch.tensor([0.2499, 0.2501, 0.7499, 0.7501, 2.49, 2.51, 4.99, 5.01, 6.0, 7.0, 1e9])
    assert decode_e2m1(encode_e2m1(near)).tolist() == [0.0, 0.5, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 6.0, 6.0, 6.0]
    # a negative value rounding to zero keeps its sign bit (code 8), as ModelOpt does
    assert encode_e2m1(torch.tensor([-0.1])).item() == 8


def test_random_rounding_is_nearest():
    x = torch.empty(10_000).uniform_(-7, 7, generator=torch.Generator().manual_seed(0))
    q = decode_e2m1(encode_e2m1(x))
    grid = torch.tensor(GRID + [-g for g in GRID])
    best = (x[:, None] - grid[None]).abs().min(dim=1).values
    assert torch.equal((x - q).abs(), best)


def test_pack_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 8]], dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.tolist() == [[0x21, 0x8F]]
    assert torch.equal(unpack_e2m1(packed), codes)
    with pytest.raises(ValueError, match="even"):
        pack_e2m1(torch.zeros(1, 3, dtype=torch.uint8))


def test_quantize_layout_and_scales():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    packed, scale, scale_2 = quantize_nvfp4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 32)
    assert scale.dtype == torch.float8_e4m3fn and scale.shape == (8, 4)
    assert scale_2.dtype == torch.float32 and scale_2.shape == ()
    assert scale_2.item() == pytest.approx(w.abs().max().item() / (6 * 448))
    # the block holding the global amax gets a scale of (about) 448
    assert scale.float().max().item() == 448.0


def test_reference_dequantiser_agrees_bit_for_bit():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 48, generator=g) * torch.logspace(-3, 1, 48)  # blocks of very different ranges
    w[2, 16:32] = 0.0  # an all-zero block
    packed, scale, scale_2 = quantize_nvfp4(w)
    ref = reference_dequantize(packed, scale, scale_2)
    assert torch.equal(dequantize_nvfp4(packed, scale, scale_2, torch.float32), ref)
    assert torch.equal(dequantize_nvfp4(packed, scale, scale_2, torch.bfloat16), ref.to(torch.bfloat16))
    assert scale[2, 1].float().item() == 1.0 and (ref[2, 16:32] == 0).all()


def test_dequantize_random_codes_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    packed = torch.randint(0, 256, (5, 16), dtype=torch.uint8, generator=g)
    scale = (torch.rand(5, 2, generator=g) * 400 + 0.01).to(torch.float8_e4m3fn)
    scale_2 = torch.tensor(0.00123, dtype=torch.float32)
    assert torch.equal(dequantize_nvfp4(packed, scale, scale_2, torch.float32), reference_dequantize(packed, scale, scale_2))


def test_leading_batch_dims_match_per_matrix():
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(16, 32, generator=g) for _ in range(3)]
    qs = [quantize_nvfp4(w) for w in ws]
    stacked = dequantize_nvfp4(
        torch.stack([q[0] for q in qs]), torch.stack([q[1] for q in qs]), torch.tensor(0.5), torch.float32
    )
    for k, q in enumerate(qs):
        assert torch.equal(stacked[k], dequantize_nvfp4(q[0], q[1], 0.5, torch.float32))


def test_quantize_error_on_gaussian_weights():
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(5))
    packed, scale, scale_2 = quantize_nvfp4(w)
    err = ((dequantize_nvfp4(packed, scale, scale_2, torch.float32) - w).norm() / w.norm()).item()
    print(f"\nNVFP4 relative Frobenius error on N(0,1) 512x1024: {err:.4f}")
    assert 0.05 < err < 0.13


def test_all_zero_tensor():
    packed, scale, scale_2 = quantize_nvfp4(torch.zeros(4, 32))
    assert (packed == 0).all() and scale_2.item() == 1.0 and (scale.float() == 1.0).all()
    assert (dequantize_nvfp4(packed, scale, scale_2, torch.float32) == 0).all()


def test_tiny_block_scale_clamped_to_fp8_subnormal():
    w = torch.zeros(1, 32)
    w[0, 0] = 1000.0
    w[0, 16] = 1e-6  # amax_block / (6*scale_2) underflows fp8; clamped to 2^-9, not 0
    _, scale, _ = quantize_nvfp4(w)
    assert scale[0, 1].float().item() == 2.0**-9


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_nvfp4(torch.randn(4, 40))
    with pytest.raises(ValueError, match="group_size must be 16"):
        quantize_nvfp4(torch.randn(4, 64), group_size=32)
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_nvfp4(torch.tensor([[float("nan")] * 16]))
    with pytest.raises(ValueError, match="shapes disagree"):
        dequantize_nvfp4(torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 2).to(torch.float8_e4m3fn), 1.0)

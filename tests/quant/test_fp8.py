"""FP8 E4M3 per-tensor quantisation and KV-cache helpers."""

import pytest
import torch

from nemoh.quant.fp8 import (
    dequantize_fp8,
    dequantize_kv,
    fp8_scale_from_amax,
    quantize_fp8,
    quantize_kv,
    to_float8_e4m3,
)


def test_saturation_above_448():
    x = torch.tensor([448.0, 449.0, 500.0, 1e6, float("inf"), -1e6, -float("inf")])
    assert to_float8_e4m3(x).float().tolist() == [448.0, 448.0, 448.0, 448.0, 448.0, -448.0, -448.0]
    assert torch.isnan(to_float8_e4m3(torch.tensor([float("nan")])).float()).all()


def test_round_to_nearest_even():
    # E4M3 has 3 mantissa bits: between 16 and 32 the step is 2; 17 and 19 are ties.
    x = torch.tensor([17.0, 19.0, 17.01, 1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10])
    assert to_float8_e4m3(x).float().tolist() == [16.0, 20.0, 18.0, 1.0, 1.25, 0.0, 2.0**-8]


def test_scale_is_amax_over_448():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == ()
    assert scale.item() == pytest.approx(w.abs().max().item() / 448)
    assert q.float().abs().max().item() == 448.0
    assert fp8_scale_from_amax(0.0).item() == 1.0


def test_fp8_error_on_gaussian_weights():
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_fp8(w)
    err = ((dequantize_fp8(q, scale, torch.float32) - w).norm() / w.norm()).item()
    print(f"\nFP8 relative Frobenius error on N(0,1) 512x1024: {err:.4f}")
    assert 0.01 < err < 0.05


def test_kv_round_trip():
    k = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(2)) * 3
    scale = k.abs().max() / 448
    back = dequantize_kv(quantize_kv(k, scale), scale, torch.float32)
    assert ((back - k).norm() / k.norm()).item() < 0.05
    assert quantize_kv(torch.tensor([1e4]), 1.0).float().item() == 448.0

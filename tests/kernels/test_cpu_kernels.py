"""The native CPU kernels against their PyTorch references, kernel by kernel.

Products that read packed weights must equal dequantise-then-multiply (nemoh.quant) to float32 rounding for
every format and for shapes that are not multiples of the vector width or of the 16-value scale block.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

from nemoh.kernels import cpu_library as C
from nemoh.kernels.linear_cpu import linear
from nemoh.models.linear import Linear
from nemoh.quant.fp8 import dequantize_fp8, quantize_fp8
from nemoh.quant.linear import FP8Linear, NVFP4Linear
from nemoh.quant.nvfp4 import dequantize_nvfp4, quantize_nvfp4

LIB = C.library()
pytestmark = pytest.mark.skipif(LIB is None, reason="the native CPU kernels are not built")


def test_every_struct_mirror_has_the_c_size():
    sizes = LIB.struct_sizes()
    assert len(sizes) == len(C.STRUCTS)
    for name, size in zip(C.STRUCTS, sizes):
        assert ctypes.sizeof(getattr(C, name)) == size, name


def make_linear(fmt: str, n: int, k: int, gen: torch.Generator, bias: bool = False):
    """(module, float32 reference weight (n, k), float32 bias or None)."""
    w = torch.randn(n, k, generator=gen) * 0.05
    if fmt in ("f32", "bf16", "f16"):
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[fmt]
        m = Linear(k, n, bias=bias)
        with torch.no_grad():
            m.weight.copy_(w)
            if bias:
                m.bias.normal_(generator=gen)
        m.weight.data = m.weight.data.to(dtype)
        return m, m.weight.float(), m.bias.detach().float() if bias else None
    if fmt == "fp8":
        m = FP8Linear(k, n)
        q, s = quantize_fp8(w)
        m.weight.copy_(q)
        m.weight_scale.copy_(s)
        return m, dequantize_fp8(q, s, torch.float32), None
    m = NVFP4Linear(k, n)
    p, s, s2 = quantize_nvfp4(w)
    m.weight.copy_(p)
    m.weight_scale.copy_(s)
    m.weight_scale_2.copy_(s2)
    return m, dequantize_nvfp4(p, s, s2, torch.float32), None


SHAPES = [(1, 16), (7, 48), (33, 80), (64, 256), (129, 1040), (5, 1037)]


@pytest.mark.parametrize("fmt", ["f32", "bf16", "f16", "fp8", "nvfp4"])
@pytest.mark.parametrize("n, k", SHAPES)
def test_linear_equals_dequantise_then_multiply(fmt, n, k):
    if fmt == "nvfp4" and k % 16:
        pytest.skip("NVFP4 needs in_features % 16 == 0 (the checkpoint format)")
    gen = torch.Generator().manual_seed(n * 1000 + k)
    module, ref_w, _ = make_linear(fmt, n, k, gen)
    for rows in (1, 2, 3, 4, 5, 9, 17, 40):
        x = torch.randn(rows, k, generator=gen)
        got = linear(x, module)
        want = (x.double() @ ref_w.double().T)
        err = float((got.double() - want).abs().max() / want.abs().max())
        assert err <= 1e-5, (rows, err)


@pytest.mark.parametrize("epilogue", [C.STORE, C.RELU2, C.ADD])
@pytest.mark.parametrize("round_mode, dtype", [(C.ROUND_NONE, torch.float32), (C.ROUND_BF16, torch.bfloat16),
                                               (C.ROUND_F16, torch.float16)])
def test_linear_epilogues_and_rounding(epilogue, round_mode, dtype):
    """bias, relu(.)^2 or += into the output, each stored value rounded as a model of `dtype` stores it."""
    gen = torch.Generator().manual_seed(3)
    module, ref_w, bias = make_linear("f32", 40, 72, gen, bias=True)
    for rows in (1, 6):
        x = torch.randn(rows, 72, generator=gen)
        old = torch.randn(rows, 40, generator=gen).to(dtype).float()
        out = old.clone()
        linear(x, module, out, epilogue=epilogue, round=round_mode)
        acc = (x.double() @ ref_w.double().T + bias.double()).float().to(dtype).float()
        if epilogue == C.RELU2:
            want = acc.relu().square().to(dtype).float()
        elif epilogue == C.ADD:
            want = (old + acc).to(dtype).float()
        else:
            want = acc
        # one rounding step apart at most where the float32 sums straddle a rounding boundary
        ulp = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
        assert torch.allclose(out, want, rtol=ulp, atol=ulp * float(want.abs().max()))
        assert torch.equal(out, out.to(dtype).float())     # every stored value is representable in dtype


def test_argmax_takes_the_first_maximum():
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0], [float("-inf"), -3.0, -3.0, -4.0]])
    out = torch.zeros(2, dtype=torch.int64)
    args = C.ArgmaxArgs(rows=2, logits=logits.data_ptr(), stride=4, vocab=4, out=out.data_ptr())
    LIB.call("nemoh_argmax", args)
    assert out.tolist() == logits.argmax(-1).tolist() == [1, 1]


def test_threads_follow_torch():
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            gen = torch.Generator().manual_seed(n)
            module, ref_w, _ = make_linear("bf16", 300, 256, gen)
            x = torch.randn(3, 256, generator=gen)
            assert torch.allclose(linear(x, module), x @ ref_w.T, rtol=1e-5, atol=1e-5)
            assert LIB.threads == n
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("rows", [1, 7, 64, 65, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_module_forward_reads_the_packed_weight(fmt, rows, dtype):
    """The module's inference forward (native product up to NATIVE_MAX_ROWS rows, tiles beyond) equals the
    whole-weight dequantisation it replaces."""
    from nemoh.kernels.quant_dispatch import TILE_ELEMENTS

    gen = torch.Generator().manual_seed(rows)
    n = 3 * max(16, TILE_ELEMENTS // 96) + 5               # several tiles and a short last one
    module, ref_w, _ = make_linear(fmt, n, 96, gen)
    x = torch.randn(2, rows, 96, generator=gen).to(dtype)
    with torch.inference_mode():
        got = module(x)
    want = torch.nn.functional.linear(x, ref_w.to(dtype))
    assert got.shape == (2, rows, n) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max())), rows

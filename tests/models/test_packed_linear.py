"""The packed CPU product of `nemoh.models.linear` against `F.linear`, and when its copy is remade."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import nemoh.models.linear as linear_module
from nemoh.models.linear import PACKED_DTYPES, Linear, PackedWeight

needs_packing = pytest.mark.skipif(torch.float32 not in PACKED_DTYPES, reason="PyTorch built without oneDNN")


@pytest.fixture
def pack_small(monkeypatch):
    """These tests' weights are small; packing is otherwise kept for weights of PACK_MIN_ELEMENTS and more."""
    monkeypatch.setattr(linear_module, "PACK_MIN_ELEMENTS", 0)


@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_product_matches_f_linear(dtype, bias, pack_small):
    if dtype not in PACKED_DTYPES:
        pytest.skip("this CPU has no bfloat16 arithmetic")
    torch.manual_seed(0)
    layer = Linear(96, 200, bias=bias).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        for x in (torch.randn(1, 96), torch.randn(4, 96), torch.randn(2, 7, 96), torch.randn(96, 33).t()):
            x = x.to(dtype)
            got = layer(x)
            assert got.shape == x.shape[:-1] + (200,)
            torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), atol=tol, rtol=tol)
        assert layer.packed_weight.packed is not None and layer.packed_weight.packed.is_mkldnn


@needs_packing
def test_copy_is_remade_when_the_weight_changes_in_place_or_is_replaced(pack_small):
    layer = Linear(16, 8, bias=False)
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x)
        first = layer.packed_weight.packed
        layer(x)
        assert layer.packed_weight.packed is first               # unchanged weight: the same copy
        layer.weight.mul_(3.0)                                    # in place: the version counter moves
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
        assert layer.packed_weight.packed is not first
        layer.weight = torch.nn.Parameter(torch.randn(8, 16))    # a new tensor
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    with torch.inference_mode():                                  # a weight made under inference_mode
        layer.weight = torch.nn.Parameter(torch.randn(8, 16))
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight))


def test_training_and_other_dtypes_take_f_linear():
    layer = Linear(16, 8)
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()                                    # autograd on: F.linear, gradients flow
    assert layer.weight.grad is not None and x.grad is not None
    assert layer.packed_weight.packed is None
    half = Linear(16, 8).to(torch.float16)
    with torch.inference_mode():
        xh = torch.randn(2, 16, dtype=torch.float16)
        # float16 takes the native panel product where it is built (float32 sums rounded once), else F.linear
        want = F.linear(xh.float(), half.weight.float(), half.bias.float()).half()
        torch.testing.assert_close(half(xh), want, rtol=2e-3, atol=2e-3)
        assert half.packed_weight.packed is None                  # float16: never oneDNN's packed copy


@needs_packing
def test_copies_and_pickles_start_without_the_packed_copy(pack_small):
    layer = Linear(16, 8)
    with torch.no_grad():
        layer(torch.randn(2, 16))
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert isinstance(clone.packed_weight, PackedWeight) and clone.packed_weight.packed is None
        with torch.no_grad():
            x = torch.randn(2, 16)
            torch.testing.assert_close(clone(x), layer(x))


@needs_packing
def test_only_weights_of_pack_min_elements_and_more_are_packed():
    small = Linear(64, linear_module.PACK_MIN_ELEMENTS // 64 - 1)
    large = Linear(64, linear_module.PACK_MIN_ELEMENTS // 64)
    with torch.inference_mode():
        x = torch.randn(4, 64)
        torch.testing.assert_close(small(x), F.linear(x, small.weight, small.bias))
        torch.testing.assert_close(large(x), F.linear(x, large.weight, large.bias))
    assert small.packed_weight.packed is None and large.packed_weight.packed is not None


@needs_packing
def test_autocast_is_honoured(pack_small):
    """Under autocast the product is autocast's (bfloat16 from float32 weights), not the packed float32 one."""
    layer = Linear(96, 200)
    x = torch.randn(4, 96)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.linear(x, layer.weight, layer.bias), atol=5e-2, rtol=5e-2)

"""The Triton GPU kernels (nemoh/kernels/*_triton.py) on the CPU, under Triton's interpreter, against their references.

Tolerances. The kernels multiply bfloat16 operands and accumulate in float32 (interpreted: the same bfloat16 values
in float32, see quant_triton.py), with the weights dequantised exactly and the tensor scale applied once at the end:
- against float32 arithmetic on the same values (the dequantised weights, the bfloat16 inputs) they differ by the
  final rounding to bfloat16, at most half a bfloat16 ulp, 2^-8 relative, plus float32 noise: rtol 2^-8 and atol
  1e-5 of the output's largest value (dense products); the fused experts also round h = relu²(up) to bfloat16, as
  the emulation here does, and a value of h near a rounding boundary may land on the other side, hence rtol 2^-7;
- against nemoh's own bfloat16 paths (the quantized module's forward, the model's `_sorted_experts`), which round
  each weight and each intermediate to bfloat16 at other points, a few bfloat16 ulps of the largest output: atol
  2^-6 * max|ref| (4 ulps at the top binade) and rtol 2^-6.
The dequantisation itself is checked bit for bit, the alignment exactly.
"""
import importlib.util
import math
import os
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

from nemoh.kernels.triton_support import HAVE_TRITON

if not HAVE_TRITON:
    pytest.skip("triton is not installed (pip install 'nemoh[test]'): the interpreter tests need it",
                allow_module_level=True)

# Before any kernel module is imported: `triton.jit` chooses the interpreter when a function is decorated.
os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from nemoh.config import NemotronHConfig  # noqa: E402
from nemoh.kernels.moe_align import max_blocks, moe_align  # noqa: E402
from nemoh.kernels.moe_triton import fused_experts, latent_moe_forward  # noqa: E402
from nemoh.kernels.packed_weights import (  # noqa: E402
    FORMAT_FP8, FORMAT_NVFP4, ExpertWeights, kernel_weight, stack_experts)
from nemoh.kernels.quant_linear_triton import linear, quant_linear  # noqa: E402
from nemoh.kernels.quant_triton import INTERPRETED, weight_tile  # noqa: E402
from nemoh.kernels.triton_reference import dequantized, reference_experts  # noqa: E402
from nemoh.models.moe import LatentMoE  # noqa: E402
from nemoh.quant.fp8 import quantize_fp8, to_float8_e4m3  # noqa: E402
from nemoh.quant.linear import FP8Linear, NVFP4Linear, apply_quantization  # noqa: E402
from nemoh.quant.modelopt import QuantConfig  # noqa: E402
from nemoh.quant.nvfp4 import dequantize_nvfp4, quantize_nvfp4  # noqa: E402

# 8 experts, top-2, latent L = 32, expert width I = 48: the interpreted tile is 32 x 32, so the down projection's
# K = 48 ends on a partial tile and I = 48 on a partial row tile
CONFIG = dict(model_type="nemotron_h", vocab_size=64, hidden_size=64, hybrid_override_pattern="M*E",
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8,
              ssm_state_size=8, n_groups=2, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
              moe_latent_size=32, moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1)
FORMATS = ["nvfp4", "fp8", "bf16"]


def test_kernels_run_interpreted():
    assert INTERPRETED


def _quantize_into(module: nn.Module, weight: torch.Tensor) -> None:
    if isinstance(module, NVFP4Linear):
        for name, tensor in zip(("weight", "weight_scale", "weight_scale_2"), quantize_nvfp4(weight)):
            module.load_tensor(name, tensor)
    else:
        for name, tensor in zip(("weight", "weight_scale"), quantize_fp8(weight)):
            module.load_tensor(name, tensor)


def _moe(fmt: str, seed: int = 0, only_experts: bool = True) -> LatentMoE:
    """A bfloat16 LatentMoE whose experts (and, unless only_experts, its latent projections and shared expert)
    hold `fmt` weights quantized from random ones."""
    torch.manual_seed(seed)
    moe = LatentMoE(NemotronHConfig.from_dict(CONFIG), 2)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.2)
    moe = moe.to(torch.bfloat16)
    moe.gate.float()
    if fmt != "bf16":
        dense = {name: m.weight.detach().float() for name, m in moe.named_modules() if isinstance(m, nn.Linear)}
        exclude = ["*latent*", "shared_experts.*"] if only_experts else []
        apply_quantization(moe, QuantConfig.from_dict({"quantization": {"quant_algo": fmt.upper(),
                                                                          "exclude_modules": exclude}}))
        for name, m in moe.named_modules():
            if isinstance(m, (NVFP4Linear, FP8Linear)):
                _quantize_into(m, dense[name])
    return moe


def _routing(moe: LatentMoE, num_tokens: int, seed: int = 1):
    torch.manual_seed(seed)
    x = torch.randn(num_tokens, CONFIG["hidden_size"], dtype=torch.bfloat16)
    with torch.no_grad():
        weights, ids = moe.gate(x)
        u = moe.fc1_latent_proj(x)
    return x, u, weights, ids


def _bf16_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-6, atol=2**-6 * scale)


# --- alignment -------------------------------------------------------------------------------------------------


def _expected_alignment(ids: torch.Tensor, num_experts: int, block_m: int):
    """The blocks by the definition in moe_align's docstring, with Python lists."""
    flat = ids.reshape(-1).tolist()
    num_pairs = len(flat)
    sorted_ids, expert_ids = [], []
    for e in range(num_experts):
        pairs = [p for p, chosen in enumerate(flat) if chosen == e]
        blocks = math.ceil(len(pairs) / block_m)
        sorted_ids += pairs + [num_pairs] * (blocks * block_m - len(pairs))
        expert_ids += [e] * blocks
    valid = len(expert_ids)
    total = max_blocks(num_pairs, num_experts, block_m)
    assert valid <= total
    return sorted_ids + [num_pairs] * ((total - valid) * block_m), expert_ids + [-1] * (total - valid), valid


@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_m", [(1, 2, 8, 16), (3, 2, 8, 16), (17, 2, 8, 4),
                                                                  (40, 3, 5, 8), (6, 4, 64, 16), (5, 2, 8, 1)])
def test_moe_align_matches_its_definition(num_tokens, top_k, num_experts, block_m):
    torch.manual_seed(num_tokens * 31 + block_m)
    ids = torch.rand(num_tokens, num_experts).topk(top_k, dim=-1).indices
    skewed = torch.stack([torch.arange(top_k)] * num_tokens)        # every token picks experts 0..k-1
    spread = torch.arange(num_tokens * top_k).reshape(num_tokens, top_k) % num_experts
    for routing in (ids, skewed, spread):
        align = moe_align(routing, num_experts, block_m)
        sorted_ids, expert_ids, valid = _expected_alignment(routing, num_experts, block_m)
        assert align.sorted_pair_ids.dtype == align.expert_ids.dtype == align.num_valid_blocks.dtype == torch.int32
        assert align.sorted_pair_ids.tolist() == sorted_ids
        assert align.expert_ids.tolist() == expert_ids
        assert align.num_valid_blocks.tolist() == [valid]
        # static shapes: the same for every routing of this batch
        assert align.sorted_pair_ids.shape == (max_blocks(num_tokens * top_k, num_experts, block_m) * block_m,)


def test_max_blocks_is_reached_when_every_pair_has_its_own_expert():
    ids = torch.arange(6).reshape(3, 2)
    assert moe_align(ids, 8, 16).num_valid_blocks.item() == max_blocks(6, 8, 16) == 6
    # Super's decode: 22 blocks for one token, not the (22 + 512 * 15) / 16 of a bound that ignores min(E, P)
    assert max_blocks(22, 512, 16) == 22


# --- dequantisation in registers --------------------------------------------------------------------------------


@triton.jit
def _tile_kernel(w_ptr, block_scale_ptr, out_ptr, N, K, stride_wn, stride_sn, FORMAT: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w = weight_tile(w_ptr, block_scale_ptr, offs_n, k0, N, K, stride_wn, stride_sn, FORMAT, BLOCK_N, BLOCK_K, True)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w, mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


def test_weight_tile_dequantises_exactly():
    """Every E2M1 code, block scales from the smallest E4M3 subnormal to 448: the tile (without the tensor scale)
    equals nemoh.quant's dequantisation with a unit tensor scale bit for bit."""
    torch.manual_seed(0)
    n, k = 40, 48
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    block_scale = to_float8_e4m3(torch.rand(n, k // 16) * 8)
    block_scale[0, 0], block_scale[1, 1], block_scale[2, 2] = 2.0**-9, 448.0, 0.0
    out = torch.empty(n, k)
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 32))
    _tile_kernel[grid](codes, block_scale, out, n, k, codes.stride(0), block_scale.stride(0), FORMAT=FORMAT_NVFP4,
                       BLOCK_N=32, BLOCK_K=32)
    assert torch.equal(out, dequantize_nvfp4(codes, block_scale, 1.0, torch.float32))

    fp8 = to_float8_e4m3(torch.randn(n, k) * 100)
    _tile_kernel[grid](fp8, fp8, out, n, k, fp8.stride(0), 0, FORMAT=FORMAT_FP8, BLOCK_N=32, BLOCK_K=32)
    assert torch.equal(out, fp8.float())


# --- dense products --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme,in_features", [("nvfp4", 48), ("fp8", 40)])
def test_quant_linear_matches_the_module(scheme, in_features):
    """K = 48 / 40 with 32-wide K tiles (a partial last tile; FP8's 40 is not even a multiple of 16), N = 40 over
    32-row tiles; 1, 5 and 33 rows; K whole or split 2 and 3 ways (3 leaves a split empty)."""
    torch.manual_seed(0)
    module = (NVFP4Linear if scheme == "nvfp4" else FP8Linear)(in_features, 40)
    _quantize_into(module, torch.randn(40, in_features) * 0.1)
    exact = module.dequantized_weight(torch.float32)
    for rows in (1, 5, 33):
        x = torch.randn(rows, in_features, dtype=torch.bfloat16)
        expected = x.float() @ exact.t()
        for split_k in (None, 2, 3):
            out = quant_linear(x, kernel_weight(module), split_k=split_k)
            assert out.dtype == torch.bfloat16 and out.shape == (rows, 40)
            top = expected.abs().max().item()
            torch.testing.assert_close(out.float(), expected, rtol=2**-8, atol=1e-5 * top)
            _bf16_close(out, module(x))
    x3 = torch.randn(2, 3, in_features, dtype=torch.bfloat16)
    assert linear(x3, module).shape == (2, 3, 40)


# --- fused experts ---------------------------------------------------------------------------------------------


def _emulated_experts(u, weights, ids, experts: ExpertWeights) -> torch.Tensor:
    """The fused kernels' arithmetic in float32: exact weights, h rounded to bfloat16, a float32 sum per token."""
    up, down = dequantized(experts.up, torch.float32), dequantized(experts.down, torch.float32)
    out = torch.zeros(u.shape[0], experts.width)
    for t in range(u.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            h = torch.relu(up[e] @ u[t].float()).square().to(torch.bfloat16).float()
            out[t] += weights[t, j] * (down[e] @ h)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_experts_match_the_model(fmt):
    moe = _moe(fmt)
    experts = stack_experts(moe)
    for num_tokens in (1, 3, 17):
        _, u, weights, ids = _routing(moe, num_tokens)
        out = fused_experts(u, weights, ids, experts)
        assert out.dtype == torch.bfloat16 and out.shape == u.shape
        emulated = _emulated_experts(u, weights, ids, experts)
        torch.testing.assert_close(out.float(), emulated, rtol=2**-7, atol=1e-5 * emulated.abs().max().item())
        with torch.no_grad():
            _bf16_close(out, moe._sorted_experts(u, weights, ids))


def test_fused_experts_with_several_blocks_per_expert():
    """17 tokens all routed to experts 0 and 1: two blocks of 16 each (one padded), six experts without a block."""
    moe = _moe("nvfp4")
    experts = stack_experts(moe)
    _, u, weights, _ = _routing(moe, 17)
    ids = torch.stack([torch.tensor([1, 0])] * 17)
    out = fused_experts(u, weights, ids, experts, block_m=16)
    with torch.no_grad():
        _bf16_close(out, moe._sorted_experts(u, weights, ids))


def test_reference_experts_match_the_model():
    """The benchmark's competitor (dequantise + grouped product) computes what the model does."""
    for fmt in FORMATS:
        moe = _moe(fmt)
        _, u, weights, ids = _routing(moe, 9)
        with torch.no_grad():
            _bf16_close(reference_experts(u, weights, ids, stack_experts(moe)), moe._sorted_experts(u, weights, ids))


def test_latent_moe_forward_matches_the_layer():
    """Everything quantized (experts, latent projections, shared expert) and NVFP4: the whole layer."""
    moe = _moe("nvfp4", only_experts=False)
    assert isinstance(moe.fc1_latent_proj, NVFP4Linear) and isinstance(moe.shared_experts.down_proj, NVFP4Linear)
    experts = stack_experts(moe)
    for num_tokens in (1, 4):
        x, _, _, _ = _routing(moe, num_tokens)
        with torch.no_grad():
            _bf16_close(latent_moe_forward(moe, x, experts), moe(x))


# --- expert stacking and byte accounting ------------------------------------------------------------------------


def test_stack_experts_keeps_one_copy():
    moe = _moe("nvfp4")
    before = [(e.up_proj.weight.clone(), e.down_proj.weight_scale.clone()) for e in moe.experts]
    experts = stack_experts(moe)
    assert experts.up.data.shape == (8, 48, 16) and experts.down.block_scale.shape == (8, 32, 3)
    assert experts.up.scale.shape == (8,)
    for i, e in enumerate(moe.experts):
        assert e.up_proj.weight.data_ptr() == experts.up.data[i].data_ptr()          # a view, not a copy
        assert e.down_proj.weight_scale_2.data_ptr() == experts.down.scale[i].data_ptr()
        assert torch.equal(e.up_proj.weight, before[i][0])
        assert torch.equal(e.down_proj.weight_scale.view(torch.uint8), before[i][1].view(torch.uint8))

    bf16 = _moe("bf16")
    stacked = stack_experts(bf16)
    assert stacked.up.data.data_ptr() == bf16._stacked_weights()[0].data_ptr()        # the model's own stack

    with pytest.raises(ValueError, match="mix"):
        mixed = _moe("fp8")
        mixed.experts[3].up_proj = nn.Linear(32, 48, bias=False).to(torch.bfloat16)
        stack_experts(mixed)


def test_byte_accounting():
    """The bytes a pass reads: each selected expert's whole up and down weights once, as stored."""
    expected_per_expert = {
        "nvfp4": 2 * (48 * 32 // 2 + 48 * 32 // 16 + 4),
        "fp8": 2 * (48 * 32 + 4),
        "bf16": 2 * 2 * 48 * 32,
    }
    for fmt, per_expert in expected_per_expert.items():
        moe = _moe(fmt)
        experts = stack_experts(moe)
        one = moe.experts[0]
        stored = sum(t.numel() * t.element_size() for p in (one.up_proj, one.down_proj)
                     for name, t in p.named_buffers() if name != "input_scale")
        stored += sum(t.numel() * t.element_size() for t in one.parameters())
        assert experts.expert_nbytes() == per_expert == stored
        ids = torch.tensor([[0, 5], [5, 2], [0, 2], [7, 0]])     # experts 0, 2, 5, 7 selected
        assert experts.selected_nbytes(ids) == 4 * per_expert


# --- no host synchronisation ------------------------------------------------------------------------------------


def _host_sync(*args, **kwargs):
    raise AssertionError("a host synchronisation inside a path meant for captured steps")


def _no_bool_mask_getitem(original):
    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            _host_sync()
        return original(self, index)
    return getitem


def test_paths_never_synchronise_with_the_host():
    """What a CUDA graph forbids, made to raise while the kernels' Python runs: reading a value on the host
    (.item(), .tolist(), bool/int/float of a tensor, copies to the CPU), data-dependent shapes (nonzero, unique,
    bincount) and boolean-mask indexing."""
    moe = _moe("nvfp4", only_experts=False)
    experts = stack_experts(moe)
    x, u, weights, ids = _routing(moe, 5)
    module = moe.fc1_latent_proj
    with ExitStack() as stack:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique", "cpu",
                     "numpy"):
            stack.enter_context(mock.patch.object(torch.Tensor, name, _host_sync))
        for name in ("nonzero", "unique", "bincount", "masked_select"):
            stack.enter_context(mock.patch.object(torch, name, _host_sync))
        stack.enter_context(mock.patch.object(torch.Tensor, "__getitem__",
                                              _no_bool_mask_getitem(torch.Tensor.__getitem__)))
        moe_align(ids, 8, 16)
        fused_experts(u, weights, ids, experts)
        quant_linear(x, kernel_weight(module), split_k=2)
        with pytest.raises(AssertionError, match="host synchronisation"):      # the patches do bite
            reference_experts(u, weights, ids, experts)


# --- the benchmark ---------------------------------------------------------------------------------------------


def test_gpu_benchmark_exits_clearly_without_a_gpu(capsys):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_moe.py"
    spec = importlib.util.spec_from_file_location("gpu_moe", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with mock.patch.object(torch.cuda, "is_available", lambda: False), pytest.raises(SystemExit) as exit_info:
        bench.main([])
    assert "CUDA" in str(exit_info.value.code)

"""NVFP4Linear / FP8Linear buffers, forward, loading hook, and apply_quantization."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nemoh.quant.fp8 import quantize_fp8
from nemoh.quant.linear import FP8Linear, NVFP4Linear, apply_quantization
from nemoh.quant.modelopt import QuantConfig
from nemoh.quant.nvfp4 import dequantize_nvfp4, quantize_nvfp4


def _loaded_nvfp4(w):
    m = NVFP4Linear(w.shape[1], w.shape[0])
    packed, scale, scale_2 = quantize_nvfp4(w)
    m.load_tensor("weight", packed)
    m.load_tensor("weight_scale", scale)
    m.load_tensor("weight_scale_2", scale_2.reshape(1))  # (1,) accepted as well as ()
    return m, (packed, scale, scale_2)


def test_nvfp4_buffers_match_checkpoint_layout():
    m = NVFP4Linear(4096, 1024)
    buffers = {n: (tuple(b.shape), b.dtype) for n, b in m.named_buffers()}
    assert buffers == {
        "weight": ((1024, 2048), torch.uint8),
        "weight_scale": ((1024, 256), torch.float8_e4m3fn),
        "weight_scale_2": ((), torch.float32),
    }
    assert m.input_scale is None  # weight-only checkpoint (W4A16_NVFP4): no activation scale
    with_scale = NVFP4Linear(4096, 1024, has_input_scale=True)
    assert dict(with_scale.named_buffers())["input_scale"].shape == ()
    assert set(m.TENSOR_RULES) == {"weight", "weight_scale", "weight_scale_2", "input_scale"}
    assert list(m.parameters()) == []


def test_nvfp4_resident_bytes_per_param():
    m = NVFP4Linear(4096, 1024)
    nbytes = sum(b.numel() * b.element_size() for b in m.buffers())
    per_param = nbytes / (4096 * 1024)
    print(f"\nNVFP4Linear resident bytes/param: {per_param:.4f}")
    assert per_param <= 0.6


def test_nvfp4_forward_is_dequantised_matmul():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    m, (packed, scale, scale_2) = _loaded_nvfp4(w)
    x = torch.randn(3, 5, 64, generator=g)
    dense = dequantize_nvfp4(packed, scale, scale_2, torch.float32)
    assert torch.equal(m(x), F.linear(x, dense))
    assert torch.equal(m.dequantized_weight(torch.bfloat16), dense.to(torch.bfloat16))
    assert m(x.bfloat16()).dtype == torch.bfloat16
    assert "in_features=64, out_features=32, scheme=nvfp4" in repr(m)


def test_fp8_linear():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 32, generator=g)
    q, scale = quantize_fp8(w)
    m = FP8Linear(32, 16)
    m.load_tensor("weight", q)
    m.load_tensor("weight_scale", scale)
    m.load_tensor("input_scale", torch.tensor([0.5]))
    assert m.input_scale.shape == ()
    x = torch.randn(4, 32, generator=g)
    assert torch.equal(m(x), F.linear(x, q.float() * scale))


def test_load_tensor_errors_carry_the_rule():
    m = NVFP4Linear(64, 32)
    with pytest.raises(ValueError, match=r"one scale per 16 inputs"):
        m.load_tensor("weight_scale", torch.zeros(32, 8).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match=r"uint8 \[out, in/2\]"):
        m.load_tensor("weight", torch.zeros(32, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="unexpected tensor 'bias'"):
        m.load_tensor("bias", torch.zeros(32))
    with pytest.raises(ValueError, match="multiple of 16"):
        NVFP4Linear(40, 8)


def test_load_tensor_replaces_meta_buffers():
    m = NVFP4Linear(32, 16, device="meta")
    packed, scale, scale_2 = quantize_nvfp4(torch.randn(16, 32))
    for name, t in (("weight", packed), ("weight_scale", scale), ("weight_scale_2", scale_2)):
        m.load_tensor(name, t)
    assert not any(b.is_meta for b in m.buffers())
    m(torch.randn(2, 32))


class _Mixer(nn.Module):
    def __init__(self, names):
        super().__init__()
        for n in names:
            setattr(self, n, nn.Linear(32, 32, bias=False))
        self.conv1d = nn.Conv1d(32, 32, 4, groups=32)
        self.norm = nn.LayerNorm(32)


class _Layer(nn.Module):
    def __init__(self, names):
        super().__init__()
        self.mixer = _Mixer(names)


class _Toy(nn.Module):
    """Module names shaped like the NemotronH checkpoint keys."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.embeddings = nn.Embedding(10, 32)
        self.backbone.layers = nn.ModuleList(
            [_Layer(["in_proj", "out_proj"]), _Layer(["gate", "fc1_latent_proj"]), _Layer(["q_proj", "o_proj"])]
        )
        self.backbone.layers[1].mixer.experts = nn.ModuleList([_Mixer(["up_proj", "down_proj"]) for _ in range(2)])
        self.lm_head = nn.Linear(32, 10, bias=False)


def test_apply_quantization_follows_the_config():
    model = _Toy()
    q = QuantConfig.from_dict({
        "quantization": {
            "quant_algo": "NVFP4",
            "exclude_modules": ["lm_head", "*.mixer.gate", "*.fc1_latent_proj", "*.q_proj", "*.o_proj"],
        }
    })
    assert apply_quantization(model, q) == 6  # in/out_proj + 2 experts x (up, down)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["backbone.layers.0.mixer.in_proj"] == "NVFP4Linear"
    assert kinds["backbone.layers.1.mixer.experts.1.down_proj"] == "NVFP4Linear"
    assert kinds["backbone.layers.1.mixer.gate"] == "Linear"
    assert kinds["backbone.layers.2.mixer.q_proj"] == "Linear"
    assert kinds["lm_head"] == "Linear"
    assert kinds["backbone.layers.0.mixer.conv1d"] == "Conv1d"
    assert "backbone.layers.0.mixer.in_proj.weight_scale_2" in model.state_dict()
    # quant_algo NVFP4 (W4A4) checkpoints carry input_scale, so the buffer is registered
    assert model.backbone.layers[0].mixer.in_proj.input_scale.shape == ()
    assert apply_quantization(model, None) == 0


def test_apply_quantization_mixed_on_meta():
    with torch.device("meta"):
        model = _Toy()
    q = QuantConfig.from_dict({
        "quantization": {
            "quant_algo": "MIXED_PRECISION",
            "quantized_layers": {
                "model.layers.0.mixer.in_proj": {"quant_algo": "FP8"},
                "backbone.layers.1.mixer.experts.0.up_proj": {"quant_algo": "NVFP4", "group_size": 16},
            },
        }
    })
    assert apply_quantization(model, q) == 2
    assert isinstance(model.backbone.layers[0].mixer.in_proj, FP8Linear)
    assert isinstance(model.backbone.layers[1].mixer.experts[0].up_proj, NVFP4Linear)
    assert model.backbone.layers[1].mixer.experts[0].up_proj.weight.is_meta
    assert isinstance(model.backbone.layers[1].mixer.experts[1].up_proj, nn.Linear)
    assert model.backbone.layers[0].mixer.in_proj.input_scale is not None  # FP8
    assert model.backbone.layers[1].mixer.experts[0].up_proj.input_scale is not None  # NVFP4

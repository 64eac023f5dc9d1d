"""End to end: a checkpoint written by quantize_checkpoint, loaded by nemoh.load_model, gives the
same logits as the dense model whose quantized Linear weights are replaced by their dequantisation.

"""


import pytest
import torch

from _tiny import make_tiny_checkpoint, read_sharded
from nemoh.quant.fp8 import dequantize_fp8
from nemoh.quant.linear import FP8Linear, NVFP4Linear
from nemoh.quant.nvfp4 import dequantize_nvfp4
from nemoh.quant.quantize import quantize_checkpoint

from nemoh import load_model


@pytest.mark.parametrize(
    "fmt, calibrated, cls",
    [("nvfp4", False, NVFP4Linear), ("nvfp4", True, NVFP4Linear), ("fp8", True, FP8Linear)],
    ids=["W4A16_NVFP4", "NVFP4-with-input_scale", "FP8"],
)
def test_quantized_logits_match_dequantised_dense(tmp_path, fmt, calibrated, cls):
    src = make_tiny_checkpoint(tmp_path / "src")
    dst = tmp_path / "dst"
    calib = None
    if calibrated:
        calib = tmp_path / "calib.txt"
        calib.write_text("\n".join(" ".join(f"w{(i * 11 + j) % 255 + 1}" for j in range(16)) for i in range(4)))
    quantize_checkpoint(src, dst, fmt=fmt, calib_file=calib, progress=False)
    tensors = read_sharded(dst)
    quantized = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")})

    qmodel = load_model(str(dst), dtype="float32")
    modules = dict(qmodel.named_modules())
    assert quantized and all(isinstance(modules[m], cls) for m in quantized)
    assert isinstance(modules["lm_head"], torch.nn.Linear)
    for m in quantized:  # input_scale loaded exactly when the checkpoint has one
        if calibrated:
            assert modules[m].input_scale.item() == tensors[f"{m}.input_scale"].item()
        else:
            assert modules[m].input_scale is None

    dense = load_model(str(src), dtype="float32")
    dense_modules = dict(dense.named_modules())
    with torch.no_grad():
        for m in quantized:
            if fmt == "nvfp4":
                w = dequantize_nvfp4(tensors[f"{m}.weight"], tensors[f"{m}.weight_scale"], tensors[f"{m}.weight_scale_2"], torch.float32)
            else:
                w = dequantize_fp8(tensors[f"{m}.weight"], tensors[f"{m}.weight_scale"], torch.float32)
            dense_modules[m].weight.copy_(w)
        # excluded tensors went through bf16 in the quantized checkpoint; give the dense model the same
        for name, p in dense.named_parameters():
            if name in tensors and tensors[name].dtype == torch.bfloat16:
                p.copy_(tensors[name].float())

    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, want = qmodel(ids), dense(ids)
    assert got.shape == want.shape == (2, 11, 256)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_loaded_nvfp4_model_stays_packed_in_memory(tmp_path):
    """Resident bytes of the loaded model: quantized linears hold codes + scales only (<= 0.6 B/param),
    nothing is upcast at load, and the whole model is smaller than its BF16 original."""
    src = make_tiny_checkpoint(tmp_path / "src")
    dst = tmp_path / "dst"
    quantize_checkpoint(src, dst, fmt="nvfp4", progress=False)
    qmodel = load_model(str(dst), dtype="bfloat16")
    dense = load_model(str(src), dtype="bfloat16")

    def resident(module):
        tensors = {t.data_ptr(): t for t in list(module.parameters()) + list(module.buffers())}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    packed = [m for m in qmodel.modules() if isinstance(m, NVFP4Linear)]
    assert packed
    for m in packed:
        assert m.weight.dtype == torch.uint8 and m.weight_scale.dtype == torch.float8_e4m3fn
        assert resident(m) / (m.in_features * m.out_features) <= 0.6
    q_bytes, d_bytes = resident(qmodel), resident(dense)
    params_quantized = sum(m.in_features * m.out_features for m in packed)
    print(f"resident: NVFP4 model {q_bytes} B vs BF16 {d_bytes} B; {params_quantized} params packed")
    assert d_bytes - q_bytes >= params_quantized * (2 - 0.6)

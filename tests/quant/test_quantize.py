"""quantize_checkpoint on a tiny random NemotronH checkpoint."""

import json

import pytest
import torch
from safetensors import safe_open

from _tiny import make_tiny_checkpoint, read_sharded
from nemoh.quant.modelopt import QuantConfig
from nemoh.quant.nvfp4 import dequantize_nvfp4
from nemoh.quant.quantize import DEFAULT_EXCLUDES, main, quantize_checkpoint, read_calib_samples

QUANTIZED = [
    "backbone.layers.0.mixer.in_proj",
    "backbone.layers.0.mixer.out_proj",
    *[f"backbone.layers.1.mixer.experts.{j}.{p}" for j in range(8) for p in ("up_proj", "down_proj")],
    "backbone.layers.1.mixer.shared_experts.up_proj",
    "backbone.layers.1.mixer.shared_experts.down_proj",
    "backbone.layers.3.mixer.up_proj",
    "backbone.layers.3.mixer.down_proj",
]
KEPT_BF16_2D = [
    "backbone.embeddings", "lm_head", "backbone.layers.1.mixer.gate",
    "backbone.layers.1.mixer.fc1_latent_proj", "backbone.layers.1.mixer.fc2_latent_proj",
    *[f"backbone.layers.2.mixer.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("src"), sharded=True)


def _read_all(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / shard), "pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == shard
                out[k] = f.get_tensor(k)
    assert set(out) == set(index["weight_map"])
    return out


def test_nvfp4_checkpoint_layout(src, tmp_path):
    dst = tmp_path / "q"
    assert len(set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    qc = quantize_checkpoint(src, dst, fmt="nvfp4", shard_size_bytes=20_000, progress=False)
    tensors = _read_all(dst)
    source = read_sharded(src)
    assert len(list(dst.glob("model-*-of-*.safetensors"))) > 1
    for m in QUANTIZED:
        w = source[f"{m}.weight"]
        assert tensors[f"{m}.weight"].dtype == torch.uint8
        assert tensors[f"{m}.weight"].shape == (w.shape[0], w.shape[1] // 2)
        assert tensors[f"{m}.weight_scale"].dtype == torch.float8_e4m3fn
        assert tensors[f"{m}.weight_scale"].shape == (w.shape[0], w.shape[1] // 16)
        assert tensors[f"{m}.weight_scale_2"].shape == () and tensors[f"{m}.weight_scale_2"].dtype == torch.float32
        assert f"{m}.input_scale" not in tensors  # uncalibrated -> W4A16_NVFP4
        deq = dequantize_nvfp4(tensors[f"{m}.weight"], tensors[f"{m}.weight_scale"], tensors[f"{m}.weight_scale_2"], torch.float32)
        assert ((deq - w.float()).norm() / w.float().norm()).item() < 0.15
    for m in KEPT_BF16_2D:
        assert tensors[f"{m}.weight"].dtype == torch.bfloat16 and f"{m}.weight_scale" not in tensors
        assert torch.equal(tensors[f"{m}.weight"], source[f"{m}.weight"])
    assert tensors["backbone.layers.0.mixer.conv1d.weight"].dim() == 3
    quantized_modules = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale_2")}
    assert quantized_modules == set(QUANTIZED)

    assert qc["quant_algo"] == "W4A16_NVFP4" and qc["group_size"] == 16 and qc["quant_method"] == "modelopt"
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"]["exclude_modules"] == DEFAULT_EXCLUDES
    assert config["quantization_config"]["ignore"] == DEFAULT_EXCLUDES
    assert config["quantization_config"]["kv_cache_quant_algo"] is None
    hf = json.loads((dst / "hf_quant_config.json").read_text())
    assert hf["producer"]["name"] == "nemoh" and hf["quantization"]["quant_algo"] == "W4A16_NVFP4"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (dst / name).is_file()

    # the written config, read back, selects exactly the modules that were quantized
    q = QuantConfig.from_model_dir(dst)
    linear_modules = {k.rsplit(".", 1)[0] for k, t in source.items() if k.endswith(".weight") and t.dim() == 2}
    assert {m for m in linear_modules if q.scheme_for(m) == "nvfp4"} == set(QUANTIZED)


def test_fp8_with_extra_exclude_via_cli(src, tmp_path, fake_loader, calib):
    dst = tmp_path / "f"
    argv = [str(src), str(dst), "--format", "fp8", "--exclude", "*.shared_experts.*", "--calib", str(calib), "--no-progress"]
    assert main(argv) == 0
    tensors = _read_all(dst)
    assert tensors["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["backbone.layers.0.mixer.in_proj.weight_scale"].shape == ()
    assert tensors["backbone.layers.0.mixer.in_proj.input_scale"].shape == ()
    assert tensors["backbone.layers.1.mixer.shared_experts.up_proj.weight"].dtype == torch.bfloat16
    q = QuantConfig.from_model_dir(dst)
    assert q.quant_algo == "FP8" and "*.shared_experts.*" in q.exclude_modules
    assert len(list(dst.glob("model-*.safetensors"))) == 1


def test_refuses_non_empty_destination_and_bad_format(src, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "junk").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        quantize_checkpoint(src, tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="fmt must be"):
        quantize_checkpoint(src, tmp_path / "y", fmt="int4", progress=False)
    with pytest.raises(ValueError, match="'fp8' needs calib_file"):
        quantize_checkpoint(src, tmp_path / "z", fmt="fp8", progress=False)


class _TransformersModel(torch.nn.Module):
    """Stands in for nemoh.load_model in these tests: transformers' NemotronH, with its modules
    exposed under the checkpoint names (backbone.*, lm_head) as nemoh's model has them."""

    def __init__(self, path):
        super().__init__()
        from transformers import NemotronHForCausalLM

        # kept out of the module tree so that named_modules() yields the checkpoint names
        self.__dict__["inner"] = NemotronHForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.backbone, self.lm_head = self.inner.model, self.inner.lm_head

    def forward(self, input_ids):
        return self.inner(input_ids=input_ids).logits


@pytest.fixture
def fake_loader(monkeypatch):
    import nemoh

    on_load = []  # callbacks run on each loaded model

    def load_model(path, dtype="float32"):
        model = _TransformersModel(path)
        for callback in on_load:
            callback(model)
        return model

    monkeypatch.setattr(nemoh, "load_model", load_model, raising=False)
    return on_load


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 255 + 1}" for j in range(12))}) for i in range(5)))
    return path


def test_calibration_writes_input_scales(src, tmp_path, fake_loader, calib):
    assert len(read_calib_samples(calib, 3)) == 3
    dst = tmp_path / "c"
    recorded = {}
    fake_loader.append(
        lambda model: model.backbone.layers[0].mixer.in_proj.register_forward_pre_hook(
            lambda _m, a: recorded.__setitem__("in", max(recorded.get("in", 0.0), a[0].abs().max().item()))
        )
    )
    qc = quantize_checkpoint(src, dst, fmt="nvfp4", calib_file=calib, calib_samples=4, progress=False)
    assert qc["quant_algo"] == "NVFP4"
    tensors = _read_all(dst)
    for m in QUANTIZED:
        s = tensors[f"{m}.input_scale"]
        assert s.dtype == torch.float32 and s.shape == () and s.item() > 0
    assert tensors["backbone.layers.0.mixer.in_proj.input_scale"].item() == pytest.approx(recorded["in"] / (6 * 448))
    assert "backbone.layers.2.mixer.q_proj.input_scale" not in tensors
    assert QuantConfig.from_model_dir(dst).has_input_scale("backbone.layers.0.mixer.in_proj")

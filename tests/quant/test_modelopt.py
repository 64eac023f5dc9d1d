"""QuantConfig: both on-disk shapes, MIXED_PRECISION, exclude globs, and the errors."""

import json

import pytest

from nemoh.quant.modelopt import QuantConfig

HF_QUANT_CONFIG = {
    "producer": {"name": "modelopt", "version": "0.39.0"},
    "quantization": {
        "quant_algo": "NVFP4",
        "kv_cache_quant_algo": None,
        "group_size": 16,
        "exclude_modules": ["lm_head", "backbone.embeddings", "*.mixer.gate*", "*mtp*", "backbone.layers.2.mixer*"],
    },
}
# what ModelOpt's convert_hf_quant_config_format writes into config.json
CONFIG_JSON_BLOCK = {
    "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "float", "group_size": 16}, "targets": ["Linear"]}},
    "ignore": ["lm_head", "*.q_proj", "mtp"],
    "quant_algo": "NVFP4",
    "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
    "producer": {"name": "modelopt", "version": "0.39.0"},
    "quant_method": "modelopt",
}


def test_hf_quant_config_shape():
    q = QuantConfig.from_dict(HF_QUANT_CONFIG)
    assert (q.quant_algo, q.group_size, q.kv_cache_quant_algo) == ("NVFP4", 16, None)
    assert q.scheme_for("backbone.layers.3.mixer.experts.7.up_proj") == "nvfp4"
    assert q.scheme_for("backbone.layers.0.mixer.in_proj") == "nvfp4"
    assert q.scheme_for("lm_head") is None
    assert q.scheme_for("backbone.layers.1.mixer.gate") is None
    assert q.scheme_for("mtp.layers.1.mixer.experts.2.down_proj") is None
    assert q.scheme_for("backbone.layers.2.mixer.q_proj") is None  # "path*" excludes the subtree
    assert q.scheme_for("backbone.layers.20.mixer.in_proj") == "nvfp4"  # ...but not layers.20


def test_config_json_shape_uses_ignore_and_kv_cache_scheme():
    q = QuantConfig.from_dict(CONFIG_JSON_BLOCK)
    assert q.quant_algo == "NVFP4" and q.kv_cache_quant_algo == "FP8"
    assert q.exclude_modules == ["lm_head", "*.q_proj", "mtp"]
    assert q.scheme_for("backbone.layers.5.mixer.q_proj") is None
    assert q.scheme_for("mtp.layers.0.eh_proj") is None  # plain "mtp" excludes its children
    assert q.scheme_for("backbone.layers.5.mixer.k_proj") == "nvfp4"
    q2 = QuantConfig.from_dict({"quant_method": "modelopt", "quant_algo": "fp8", "exclude_modules": ["lm_head"]})
    assert q2.quant_algo == "FP8" and q2.scheme_for("backbone.layers.0.mixer.out_proj") == "fp8"


def test_weight_only_nvfp4_algo():
    q = QuantConfig.from_dict({"quantization": {"quant_algo": "W4A16_NVFP4", "group_size": 16}})
    assert q.scheme_for("backbone.layers.0.mixer.in_proj") == "nvfp4"


def test_mixed_precision_with_prefix_normalisation():
    q = QuantConfig.from_dict({
        "quantization": {
            "quant_algo": "MIXED_PRECISION",
            "kv_cache_quant_algo": "FP8",
            "exclude_modules": ["lm_head"],
            "quantized_layers": {
                "model.layers.0.mixer.in_proj": {"quant_algo": "FP8"},
                "backbone.layers.1.mixer.experts.0.up_proj": {"quant_algo": "NVFP4", "group_size": 16},
                "layers.1.mixer.shared_experts.down_proj": {"quant_algo": "W4A16_NVFP4"},
                "lm_head": {"quant_algo": "FP8"},
            },
        }
    })
    assert q.scheme_for("backbone.layers.0.mixer.in_proj") == "fp8"
    assert q.scheme_for("backbone.layers.1.mixer.experts.0.up_proj") == "nvfp4"
    assert q.scheme_for("model.layers.1.mixer.experts.0.up_proj") == "nvfp4"
    assert q.scheme_for("backbone.layers.1.mixer.shared_experts.down_proj") == "nvfp4"
    assert q.scheme_for("backbone.layers.1.mixer.experts.1.up_proj") is None  # not listed
    assert q.scheme_for("lm_head") is None  # exclusion wins over the listing


def test_exclude_patterns_with_model_prefix_match_backbone_names():
    q = QuantConfig.from_dict({"quantization": {"quant_algo": "NVFP4", "exclude_modules": ["model.layers.*.mixer.gate"]}})
    assert q.scheme_for("backbone.layers.9.mixer.gate") is None
    assert q.scheme_for("backbone.layers.9.mixer.in_proj") == "nvfp4"


@pytest.mark.parametrize(
    "body, key, rule",
    [
        ({"quant_algo": "INT8_SQ"}, "quant_algo 'INT8_SQ'", "nemoh runs NVFP4, W4A16_NVFP4, FP8"),
        ({"quant_algo": "NVFP4", "group_size": 32}, "group_size 32", "one FP8 scale per 16 inputs"),
        ({}, "missing quant_algo", "one of NVFP4"),
        ({"quant_algo": "FP8", "kv_cache_quant_algo": "NVFP4"}, "kv_cache_quant_algo 'NVFP4'", "FP8 or null"),
        ({"quant_algo": "MIXED_PRECISION"}, "quantized_layers", "non-empty"),
        (
            {"quant_algo": "MIXED_PRECISION", "quantized_layers": {"backbone.layers.0.mixer.in_proj": {"quant_algo": "INT4_AWQ"}}},
            "quantized_layers['backbone.layers.0.mixer.in_proj']",
            "not supported per layer",
        ),
        (
            {"quant_algo": "MIXED_PRECISION", "quantized_layers": {"lm_head": {"quant_algo": "NVFP4", "group_size": 64}}},
            "quantized_layers['lm_head']: group_size 64",
            "per 16 inputs",
        ),
        ({"quant_algo": "NVFP4", "exclude_modules": "lm_head"}, "exclude_modules", "list of glob strings"),
    ],
)
def test_bad_configs_name_key_and_rule(body, key, rule):
    with pytest.raises(ValueError) as exc:
        QuantConfig.from_dict({"quantization": body}, source="hf_quant_config.json")
    msg = str(exc.value)
    print(msg)
    assert key in msg and rule in msg and "hf_quant_config.json" in msg


def test_non_modelopt_quant_method_is_refused():
    with pytest.raises(ValueError, match="quant_method 'gptq'"):
        QuantConfig.from_dict({"quant_method": "gptq", "quant_algo": "NVFP4"})


def test_from_model_dir(tmp_path):
    assert QuantConfig.from_model_dir(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nemotron_h"}))
    assert QuantConfig.from_model_dir(tmp_path) is None
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(HF_QUANT_CONFIG))
    q = QuantConfig.from_model_dir(tmp_path)
    assert q.quant_algo == "NVFP4" and "*mtp*" in q.exclude_modules
    # config.json's block wins key by key; hf_quant_config fills the rest
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": CONFIG_JSON_BLOCK}))
    q = QuantConfig.from_model_dir(tmp_path)
    assert q.exclude_modules == ["lm_head", "*.q_proj", "mtp"] and q.kv_cache_quant_algo == "FP8"
    assert q.group_size == 16


def test_from_model_dir_conflicting_algos(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {**CONFIG_JSON_BLOCK, "quant_algo": "FP8"}}))
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(HF_QUANT_CONFIG))
    with pytest.raises(ValueError, match="quant_algo disagrees"):
        QuantConfig.from_model_dir(tmp_path)

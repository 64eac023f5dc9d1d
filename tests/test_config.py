"""NemotronHConfig reads every key variant and rejects invalid configs naming the key."""
from __future__ import annotations

import json
import math

import pytest

from nemoh.config import NemotronHConfig

BASE = dict(model_type="nemotron_h", vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16,
            n_routed_experts=8, num_experts_per_tok=2)


def make(**kw):
    d = dict(BASE)
    d.update(kw)
    return NemotronHConfig.from_dict(d)


def test_pattern_string_and_both_list_vocabularies_agree():
    a = make(hybrid_override_pattern="M*E-")
    b = make(layers_block_type=["mamba", "attention", "moe", "mlp"])
    c = make(layers_block_type=["linear_attention", "full_attention", "moe", "mlp"])
    assert a.layer_types == b.layer_types == c.layer_types == ["mamba", "attention", "moe", "mlp"]
    assert a.hybrid_override_pattern == "M*E-"
    assert a.attention_layer_ids == [1] and a.mamba_layer_ids == [0]


def test_legacy_mamba_aliases():
    c = make(hybrid_override_pattern="M", mamba_n_groups=4, mamba_d_conv=3, mamba_expand=1, mamba_chunk_size=64)
    assert (c.n_groups, c.conv_kernel, c.expand, c.chunk_size) == (4, 3, 1, 64)


def test_mtp_pattern_string_or_list():
    a = make(hybrid_override_pattern="M*E", num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E")
    b = make(hybrid_override_pattern="M*E", num_nextn_predict_layers=1,
             mtp_layers_block_type=["full_attention", "moe"])
    assert a.mtp_layer_types == b.mtp_layer_types == ["attention", "moe"]
    assert a.mtp_attention_layer_ids == [3]


@pytest.mark.parametrize("limit", [[0.0, float("inf")], [0.0, "Infinity"], [0.0, {"__float__": "Infinity"}]])
def test_time_step_limit_with_infinity(limit):
    c = make(hybrid_override_pattern="M", time_step_limit=limit)
    assert c.time_step_limit == (0.0, math.inf)


def test_infinity_literal_in_json_file(tmp_path):
    d = dict(BASE, hybrid_override_pattern="M")
    text = json.dumps(d)[:-1] + ', "time_step_limit": [0.0, Infinity]}'
    (tmp_path / "config.json").write_text(text)
    assert NemotronHConfig.from_pretrained(tmp_path).time_step_limit[1] == math.inf


def test_head_dim_default_and_tied_embeddings():
    d = dict(BASE, hybrid_override_pattern="*", tie_word_embeddings=True)
    del d["head_dim"]
    c = NemotronHConfig.from_dict(d)
    assert c.head_dim == 16 and c.tie_word_embeddings


def test_eos_int_becomes_list():
    assert make(hybrid_override_pattern="M", eos_token_id=2).eos_token_id == [2]


@pytest.mark.parametrize("kw,key", [
    (dict(hybrid_override_pattern="MX"), "hybrid_override_pattern"),
    (dict(layers_block_type=["mamba", "conv"]), "layers_block_type"),
    (dict(hybrid_override_pattern="*", num_key_value_heads=3), "num_key_value_heads"),
    (dict(hybrid_override_pattern="M", n_groups=3), "n_groups"),
    (dict(hybrid_override_pattern="E", n_group=3), "n_group"),
    (dict(hybrid_override_pattern="E", n_group=2, topk_group=3), "topk_group"),
    (dict(hybrid_override_pattern="E", num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(hybrid_override_pattern="M", model_type="llama"), "model_type"),
    (dict(hybrid_override_pattern="M", hidden_size=0), "hidden_size"),
    (dict(hybrid_override_pattern="M", time_step_limit=[1.0]), "time_step_limit"),
    (dict(hybrid_override_pattern="MM", num_hidden_layers=3), "num_hidden_layers"),
])
def test_invalid_configs_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        make(**kw)


@pytest.mark.parametrize("missing", ["vocab_size", "hidden_size", "model_type"])
def test_missing_required_keys(missing):
    d = dict(BASE, hybrid_override_pattern="M")
    del d[missing]
    with pytest.raises(ValueError, match=missing):
        NemotronHConfig.from_dict(d)


def test_another_models_config_is_named_as_such():
    """A Llama config has no layer pattern either; what is wrong is the model, and the message says so."""
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
             "num_hidden_layers": 32, "num_attention_heads": 32}
    with pytest.raises(ValueError, match=r"not a NemotronH checkpoint \(model_type 'llama', "
                                         r"architectures \['LlamaForCausalLM'\]\)") as e:
        NemotronHConfig.from_dict(llama)
    assert "hybrid_override_pattern" not in str(e.value)


def test_missing_layer_types():
    with pytest.raises(ValueError, match="hybrid_override_pattern"):
        NemotronHConfig.from_dict(dict(BASE))


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        NemotronHConfig.from_pretrained(tmp_path)


def test_to_dict_round_trip():
    c = make(hybrid_override_pattern="M*E-", num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E")
    assert NemotronHConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c

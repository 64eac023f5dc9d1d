"""A tiny random NemotronH checkpoint (transformers' implementation writes the HF layout)."""

import json
from pathlib import Path

import torch


def make_tiny_checkpoint(path: Path, sharded: bool = False, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    cfg = NemotronHConfig(
        vocab_size=256, hidden_size=64, layers_block_type=["linear_attention", "moe", "full_attention", "mlp"],
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, intermediate_size=96, mamba_num_heads=8,
        mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=8, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
        moe_latent_size=32, n_group=2, topk_group=1, num_nextn_predict_layers=0,
    )
    model = NemotronHForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="40KB" if sharded else "5GB")
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 256)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w2"}))
    (path / "chat_template.jinja").write_text("{{ messages }}")
    return path


def read_sharded(path: Path) -> dict:
    """Every tensor of a sharded checkpoint, by name."""
    from safetensors import safe_open

    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for shard in set(index["weight_map"].values()):
        with safe_open(str(path / shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out

"""Tiny random NemotronH checkpoints written by transformers (the numerical oracle), for tests and benchmarks.

`make_checkpoint(dir, **overrides)` writes a checkpoint in the Hugging Face layout with random weights via
`transformers.NemotronHForCausalLM(config).save_pretrained(dir)`, adds MTP weights (transformers writes none)
in a second shard with an index, copies the demo tokenizer files, and returns (dir, hf_model).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "nemoh" / "demo" / "model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

BASE_CONFIG = dict(
    vocab_size=4096,
    hidden_size=64,
    hybrid_override_pattern="M*EM-E",
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    intermediate_size=96,
    mamba_num_heads=8,
    mamba_head_dim=16,
    ssm_state_size=16,
    n_groups=2,
    conv_kernel=4,
    chunk_size=8,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=48,
    moe_latent_size=32,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    eos_token_id=[2, 11],
    bos_token_id=1,
    pad_token_id=0,
    max_position_embeddings=4096,
)


def hf_config(**overrides):
    from transformers import NemotronHConfig as HFConfig

    cfg = dict(BASE_CONFIG)
    cfg.update(overrides)
    cfg.pop("num_nextn_predict_layers", None)
    return HFConfig(**cfg)


def _perturb(state_dict: dict, generator: torch.Generator) -> None:
    """Random init leaves norms at 1 and router biases at 0; perturb them so the tests exercise them."""
    for name, t in state_dict.items():
        if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith("layernorm.weight"):
            t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=generator))
        elif name.endswith("e_score_correction_bias"):
            t.copy_(0.05 * torch.randn(t.shape, generator=generator))
        elif name.endswith("conv1d.bias") or name.endswith(".D"):
            t.copy_(t + 0.1 * torch.randn(t.shape, generator=generator))


def mtp_tensors(config: dict, generator: torch.Generator, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random MTP weights ("*E") in the checkpoint layout of REFERENCE §3."""
    h = config["hidden_size"]
    nh, kvh, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    width = config.get("moe_latent_size") or h
    e, inter = config["n_routed_experts"], config["moe_intermediate_size"]
    shared = config["moe_shared_expert_intermediate_size"]

    def rnd(*shape, std=0.05):
        return (std * torch.randn(shape, generator=generator)).to(dtype)

    def norm():
        return (1.0 + 0.2 * torch.randn(h, generator=generator)).to(dtype)

    t = {
        "mtp.layers.0.enorm.weight": norm(), "mtp.layers.0.hnorm.weight": norm(),
        "mtp.layers.0.eh_proj.weight": rnd(h, 2 * h), "mtp.layers.0.norm.weight": norm(),
        "mtp.layers.0.mixer.q_proj.weight": rnd(nh * hd, h), "mtp.layers.0.mixer.k_proj.weight": rnd(kvh * hd, h),
        "mtp.layers.0.mixer.v_proj.weight": rnd(kvh * hd, h), "mtp.layers.0.mixer.o_proj.weight": rnd(h, nh * hd),
        "mtp.layers.1.norm.weight": norm(), "mtp.layers.1.final_layernorm.weight": norm(),
        "mtp.layers.1.mixer.gate.weight": rnd(e, h).float(),
        "mtp.layers.1.mixer.gate.e_score_correction_bias": (0.05 * torch.randn(e, generator=generator)).float(),
        "mtp.layers.1.mixer.shared_experts.up_proj.weight": rnd(shared, h),
        "mtp.layers.1.mixer.shared_experts.down_proj.weight": rnd(h, shared),
    }
    for j in range(e):
        t[f"mtp.layers.1.mixer.experts.{j}.up_proj.weight"] = rnd(inter, width)
        t[f"mtp.layers.1.mixer.experts.{j}.down_proj.weight"] = rnd(width, inter)
    if config.get("moe_latent_size"):
        t["mtp.layers.1.mixer.fc1_latent_proj.weight"] = rnd(width, h)
        t["mtp.layers.1.mixer.fc2_latent_proj.weight"] = rnd(h, width)
    return t


def make_checkpoint(path, with_mtp: bool = True, seed: int = 0, dtype=torch.float32, tokenizer: bool = True,
                    **overrides):
    """Write a random checkpoint to `path`; returns (path, hf_model in float32, eval mode)."""
    from safetensors.torch import save_file
    from transformers import NemotronHForCausalLM as HFModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = hf_config(**overrides)
    hf = HFModel(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        _perturb(dict(hf.state_dict()), gen)
    hf.to(dtype).save_pretrained(path)
    hf.float()
    # nemoh reads time_step_limit from the config as vLLM does; transformers' prefill clamps dt at
    # time_step_min instead (and its decode does not clamp at all). Align the oracle with the config.
    for module in hf.modules():
        if hasattr(module, "time_step_limit"):
            module.time_step_limit = (0.0, math.inf)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    if with_mtp:
        full = dict(BASE_CONFIG)
        full.update(overrides)
        tensors = mtp_tensors(full, gen, dtype)
        save_file(tensors, str(path / "model-mtp.safetensors"), metadata={"format": "pt"})
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), "pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
        weight_map.update({k: "model-mtp.safetensors" for k in tensors})
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        config["num_nextn_predict_layers"] = 1
        config["mtp_hybrid_override_pattern"] = "*E"
        config.pop("mtp_layers_block_type", None)
    config_path.write_text(json.dumps(config, indent=2))
    if tokenizer:
        for name in TOKENIZER_FILES:
            if (DEMO_DIR / name).exists():
                shutil.copy(DEMO_DIR / name, path / name)
    return path, hf

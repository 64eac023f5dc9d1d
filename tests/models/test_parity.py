"""nemoh's full forward against transformers' NemotronH on random checkpoints (REFERENCE §1)."""
from __future__ import annotations

import pytest
import torch

import nemoh
from checkpoints import make_checkpoint

# Together these cover: all four layer types; latent and non-latent MoE; n_group > 1 with
# topk_group < n_group; GQA ratios 1 and 4; lengths that are not a multiple of chunk_size; batch > 1.
CONFIGS = {
    "all_types_latent_grouped_gqa4": dict(hybrid_override_pattern="M*EM-E", num_attention_heads=4,
                                          num_key_value_heads=1, moe_latent_size=32, n_group=2, topk_group=1),
    "no_latent_mha": dict(hybrid_override_pattern="ME*E-M", num_attention_heads=4, num_key_value_heads=4,
                          moe_latent_size=None, n_group=1, topk_group=1, num_experts_per_tok=3),
    "grouped_4_of_2_gqa2": dict(hybrid_override_pattern="*MEEM", n_routed_experts=16, n_group=4, topk_group=2,
                                num_experts_per_tok=4, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                moe_latent_size=16, n_groups=4, mamba_num_heads=8),
    "mamba_heavy_chunk5": dict(hybrid_override_pattern="MM-M*M", chunk_size=5, n_groups=1, mamba_num_heads=4,
                               mamba_head_dim=32, ssm_state_size=8, num_attention_heads=2, num_key_value_heads=1,
                               head_dim=32),
}
LENGTHS = [1, 7, 8, 21]        # chunk sizes in the configs are 8 and 5


def max_rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    path, hf = make_checkpoint(tmp_path_factory.mktemp(request.param), with_mtp=False, **CONFIGS[request.param])
    return request.param, path, hf


@pytest.mark.parametrize("batch,length", [(1, 1), (2, 7), (3, 8), (2, 21)])
def test_float32_logits_match_transformers(checkpoint, batch, length):
    name, path, hf = checkpoint
    model = nemoh.load_model(path, dtype="float32")
    ids = torch.randint(0, 4096, (batch, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = model(ids)
    err = max_rel_error(ours, ref)
    print(f"{name} B={batch} T={length}: max|dlogit|/max|logit| = {err:.2e}")
    assert err <= 1e-4


def test_bfloat16_logits_close_to_float32_reference(checkpoint):
    """bf16 has an 8-bit mantissa (relative rounding 2^-9 ~ 2e-3 per op); after a few layers of matmuls and
    norms the logits drift by a few percent of their range. We allow 5e-2 relative to the largest logit and
    require the argmax to agree on at least 90% of positions."""
    name, path, hf = checkpoint
    model = nemoh.load_model(path, dtype="bfloat16")
    ids = torch.randint(0, 4096, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = model(ids)
    err = max_rel_error(ours, ref)
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{name} bf16: max rel error {err:.2e}, argmax agreement {agree:.2f}")
    assert err <= 5e-2
    assert agree >= 0.9

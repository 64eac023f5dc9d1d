"""The sharding arithmetic, without processes: per-rank configs, ranges, size checks, and that the ranks' shares
of every checkpoint tensor put back together are the whole tensor."""
from __future__ import annotations

import pytest
import torch

from nemoh.config import NemotronHConfig
from nemoh.distributed.layout import ParallelLayout
from nemoh.distributed.sharding import tensor_slice
from nemoh.engine.memory_plan import make_plan, model_tensors

from checkpoints import BASE_CONFIG


def config(**overrides) -> NemotronHConfig:
    raw = dict(BASE_CONFIG, model_type="nemotron_h", num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E")
    raw.update(overrides)
    return NemotronHConfig.from_dict(raw)


def test_local_config_divides_what_is_sharded():
    c = config()
    local = ParallelLayout(2, 1).local_config(c)
    assert (local.num_attention_heads, local.num_key_value_heads) == (2, 1)        # 1 KV head replicated
    assert (local.mamba_num_heads, local.n_groups, local.mamba_conv_dim) == (4, 1, 4 * 16 + 2 * 16)
    assert (local.intermediate_size, local.moe_intermediate_size, local.moe_shared_expert_intermediate_size) == \
        (48, 16, 24)
    assert (local.vocab_size, local.n_routed_experts, local.hidden_size) == (4096, 8, 64)
    ep = ParallelLayout(2, 1, expert_parallel=True)
    assert ep.local_config(c).moe_intermediate_size == 32 and ep.experts(c) == (4, 8)
    assert ParallelLayout(1).local_config(c) is c


def test_kv_heads_fewer_than_ranks_follow_the_query_heads():
    c = config(num_attention_heads=8, num_key_value_heads=2)
    assert [ParallelLayout(4, r).kv_heads(c) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [ParallelLayout(2, r).kv_heads(c) for r in range(2)] == [(0, 1), (1, 2)]


def test_vocab_rows_pad_the_last_rank():
    assert [ParallelLayout(3, r).vocab(10) for r in range(3)] == [(0, 4, 4), (4, 8, 4), (8, 10, 4)]


@pytest.mark.parametrize("overrides, n, ep, needle", [
    (dict(num_attention_heads=6, num_key_value_heads=3), 4, False, "num_attention_heads 6 is not divisible by 4"),
    (dict(num_attention_heads=12, num_key_value_heads=3), 2, False, "num_key_value_heads 3 neither divides"),
    (dict(), 4, False, "n_groups 2 is not divisible by 4"),
    (dict(intermediate_size=90, n_groups=4), 4, False, "intermediate_size 90"),
    (dict(n_routed_experts=6, n_group=1, n_groups=4, mamba_num_heads=8), 4, True, "--enable-expert-parallel"),
    (dict(moe_intermediate_size=30, n_groups=4), 4, False, "moe_intermediate_size 30"),
])
def test_sizes_that_do_not_split_name_the_flag(overrides, n, ep, needle):
    with pytest.raises(ValueError, match="--tensor-parallel-size|--enable-expert-parallel") as e:
        ParallelLayout(n, 0, ep).check(config(**overrides))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_nvfp4_row_parallel_inputs_hold_whole_blocks():
    c = config()                           # shared expert 48 / 2 = 24 inputs: not whole blocks of 16
    ParallelLayout(2).check(c)
    with pytest.raises(ValueError, match="shared expert down_proj input .* NVFP4 blocks"):
        ParallelLayout(2).check(c, "NVFP4")
    ParallelLayout(2).check(config(moe_shared_expert_intermediate_size=64), "NVFP4")


@pytest.mark.parametrize("ep", [False, True])
def test_rank_shares_reassemble_every_tensor(ep):
    """Every tensor of the model (MTP included): the ranks' row / column shares, concatenated rank by rank, give
    back the whole tensor (a replicated one: every rank reads all of it); each expert lives on one rank."""
    c, n = config(moe_shared_expert_intermediate_size=64), 2
    for mod_name, _, tname, t in list(model_tensors(c)):
        name = f"{mod_name}.{tname}"
        full = torch.arange(t.numel(), dtype=torch.float64, device="cpu").reshape(t.shape)
        shares = [tensor_slice(name, list(t.shape), c, ParallelLayout(n, r, ep)) for r in range(n)]
        if any(s.skip for s in shares):
            assert sum(not s.skip for s in shares) == 1 and ep, name
            continue
        if shares[0].dim is None:
            assert all(s.dim is None for s in shares), name
            continue
        parts = [torch.cat([full.narrow(s.dim, a, b - a) for a, b in s.ranges], s.dim) for s in shares]
        # a KV head shared by several ranks (fewer KV heads than ranks) counts once
        parts = [p for i, p in enumerate(parts) if not any(torch.equal(p, q) for q in parts[:i])]
        if "in_proj" in name or "conv1d" in name:
            # Mamba: [z | x | B | C | dt] interleaved per rank; each rank's rows are distinct and all are covered
            rows = torch.cat(parts).flatten().tolist() if t.dim() == 1 else torch.cat(parts)[:, 0].tolist()
            assert sorted(rows) == (full.flatten().tolist() if t.dim() == 1 else full[:, 0].tolist()), name
        else:
            assert torch.equal(torch.cat(parts, shares[0].dim), full), name


def test_plan_per_device_weights_follow_the_sharding():
    c = config(moe_shared_expert_intermediate_size=64)
    one = make_plan(c, device_bytes=1 << 34, device_type="cuda", dtype=torch.float32)
    two = make_plan(c, device_bytes=1 << 34, device_type="cuda", dtype=torch.float32, tp=2)
    ep = make_plan(c, device_bytes=1 << 34, device_type="cuda", dtype=torch.float32, tp=2, expert_parallel=True)
    w1, w2, we = (p.resident["weights"] for p in (one, two, ep))
    assert w1 / 2 < w2 < 0.6 * w1          # replicated: norms, routers, latent projections, the MTP's eh_proj
    assert w1 / 2 < we < 0.6 * w1
    assert two.kv_bytes_per_token == one.kv_bytes_per_token     # one KV head: replicated, not halved
    assert two.mamba_bytes_per_seq < one.mamba_bytes_per_seq
    assert "tensor parallel 2 + expert parallel" in ep.summary_lines()[0]

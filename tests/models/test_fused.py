"""Inference fast paths against their plain counterparts: shared weight storage, grouped expert matmuls,
fused q/k/v, closed-form multi-step SSD."""
import copy

import pytest
import torch
from torch import nn

import nemoh.models.moe as moe_module
from nemoh.config import NemotronHConfig
from nemoh.models.attention import Attention
from nemoh.models.forward_context import ForwardContext
from nemoh.models.fused import SharedWeight
from nemoh.models.moe import LatentMoE
from nemoh.models.ssd import SSD_STEPS_BATCHED_MAX_BYTES, ssd_step, ssd_steps

CONFIG = dict(model_type="nemotron_h", vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E", num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
              n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, moe_latent_size=12,
              moe_shared_expert_intermediate_size=24, n_group=1, topk_group=1)


def test_shared_weight_repoints_parameters_and_rebuilds_after_a_move():
    layers = [nn.Linear(4, n, bias=False) for n in (3, 5, 2)]
    before = [l.weight.detach().clone() for l in layers]
    shared = SharedWeight(stack=False)
    whole = shared.get([l.weight for l in layers])
    assert torch.equal(whole, torch.cat(before))
    for l, b in zip(layers, before):   # the parameters now live inside `whole`, values unchanged
        assert torch.equal(l.weight, b)
        assert whole.data_ptr() <= l.weight.data_ptr() < whole.data_ptr() + whole.numel() * 4
    with torch.no_grad():
        layers[1].weight.mul_(2)       # an in-place update is seen through the shared tensor
    assert torch.equal(shared.get([l.weight for l in layers])[3:8], before[1] * 2)
    layers[0].weight.data = layers[0].weight.data.clone() + 1      # storage replaced: rebuilt
    assert torch.equal(shared.get([l.weight for l in layers])[:3], before[0] + 1)


def test_grouped_experts_match_one_matmul_per_expert():
    torch.manual_seed(0)
    moe = LatentMoE(NemotronHConfig.from_dict(CONFIG), 2)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(11, 32)
    with torch.no_grad():
        weights, ids = moe.gate(x)
        u = moe.fc1_latent_proj(x)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=8)
        grouped = moe._grouped_experts(u[order // 3], counts)
        looped = moe._looped_experts(u[order // 3], counts.tolist())
        padded = moe._padded_experts(u[order // 3], counts, flat[order])
    torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded, looped, rtol=1e-5, atol=1e-5)
    # training: gradients reach every used expert's own parameter
    moe(x).sum().backward()
    used = set(ids.reshape(-1).tolist())
    for e in range(8):
        grad = moe.experts[e].up_proj.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == (e in used)


def test_one_token_experts_match_the_sorted_way_for_dense_and_module_experts():
    """A decode step's token runs its experts one after another; row by row it must give what the batched
    (sorted, grouped, scattered) way gives, with dense weights and with expert modules (as quantized ones)."""
    torch.manual_seed(4)
    moe = LatentMoE(NemotronHConfig.from_dict(CONFIG), 2)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(6, 32)

    class ModuleLinear(nn.Linear):          # not a plain nn.Linear: takes the module-call branch
        pass

    with torch.inference_mode():
        batched = moe(x)
        for i in range(len(x)):
            torch.testing.assert_close(moe(x[i:i + 1]), batched[i:i + 1], rtol=1e-5, atol=1e-5)
        for e in moe.experts:
            for name in ("up_proj", "down_proj"):
                dense = getattr(e, name)
                module = ModuleLinear(dense.in_features, dense.out_features, bias=False)
                module.weight = nn.Parameter(dense.weight.detach().clone())
                setattr(e, name, module)
        assert not moe._projections()[2]
        for i in range(len(x)):
            torch.testing.assert_close(moe(x[i:i + 1]), batched[i:i + 1], rtol=1e-5, atol=1e-5)
        weights, ids = moe.gate(x[:1])
        u = moe.fc1_latent_proj(x[:1])
        wrong = moe._one_token_experts(u, weights, ids.roll(1, dims=1))      # experts paired with others' weights
        assert not torch.allclose(wrong, moe._sorted_experts(u, weights, ids), rtol=1e-3, atol=1e-3)


@pytest.fixture
def pytorch_experts(monkeypatch):
    """The PyTorch expert paths (the reference): inference would otherwise take the native CPU kernel."""
    from nemoh.kernels import cpu_library

    monkeypatch.setattr(cpu_library, "library", lambda: None)


def test_native_experts_equal_the_pytorch_reference(monkeypatch):
    from nemoh.kernels import cpu_library

    if cpu_library.library() is None:
        pytest.skip("the native CPU kernels are not built")
    torch.manual_seed(3)
    moe = LatentMoE(NemotronHConfig.from_dict({**CONFIG, "moe_latent_size": 16}), 2)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.3)
    for n in (1, 3, 11, 64):
        x = torch.randn(n, 32)
        with torch.no_grad():
            native = moe(x)
            with monkeypatch.context() as m:
                m.setattr(cpu_library, "library", lambda: None)
                reference = moe(x)
        torch.testing.assert_close(native, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def test_bfloat16_inference_takes_the_padded_experts_and_matches_float32(pytorch_experts):
    torch.manual_seed(1)
    # widths in multiples of 8: the grouped product needs 16-byte strides in bfloat16, as real models have
    moe = LatentMoE(NemotronHConfig.from_dict({**CONFIG, "moe_latent_size": 16}), 2)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(11, 32)
    with torch.no_grad():
        reference = moe(x)
        half = copy.deepcopy(moe).to(torch.bfloat16)
        half.gate.float()
        calls = []
        original = half._padded_experts
        half._padded_experts = lambda *a: calls.append(1) or original(*a)
        out = half(x.bfloat16())
        half(x[:1].bfloat16())                      # one token: the grouped product
    assert len(calls) == 1
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


def test_float32_inference_takes_the_padded_experts_only_in_its_token_range(pytorch_experts):
    torch.manual_seed(2)
    moe = LatentMoE(NemotronHConfig.from_dict(CONFIG), 2)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.3)
    calls = []
    original = moe._padded_experts
    moe._padded_experts = lambda *a: calls.append(a[0].shape[0]) or original(*a)
    inside = moe_module.PADDED_TOKENS_FLOAT32
    with torch.no_grad():
        for n in (inside.start - 1, inside.start, inside.stop - 1, inside.stop):
            x = torch.randn(n, 32)
            calls.clear()
            out = moe(x)
            assert bool(calls) == (n in inside), n
            one_by_one = torch.cat([moe(x[i:i + 1]) for i in range(n)])   # one token: no padded product
            torch.testing.assert_close(out, one_by_one, rtol=1e-5, atol=1e-5)


def test_padded_rows_of_the_grouped_experts_change_no_output_nor_gradient(monkeypatch):
    """Training and long prefills in bfloat16 pad each expert's rows to a multiple of GROUP_ROWS; the padding
    must not show in the outputs, the gradient of the inputs nor those of the experts."""
    import nemoh.models.moe as moe_module

    torch.manual_seed(2)
    moe = LatentMoE(NemotronHConfig.from_dict({**CONFIG, "moe_latent_size": 16}), 2)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.3)
    counts = torch.tensor([0, 70, 1, 64, 200, 5, 133, 127])          # 600 pairs: above GROUP_PAD_MIN_PAIRS
    assert counts.sum() >= moe_module.GROUP_PAD_MIN_PAIRS
    inputs = torch.randn(int(counts.sum()), 16, dtype=torch.bfloat16)
    upstream = torch.randn(int(counts.sum()), 16)

    def run(pad_from):
        monkeypatch.setattr(moe_module, "GROUP_PAD_MIN_PAIRS", pad_from)
        moe.zero_grad()
        x = inputs.clone().requires_grad_()
        out = moe._grouped_experts(x, counts)
        (out.float() * upstream).sum().backward()
        return out.float(), x.grad.float(), torch.stack([e.up_proj.weight.grad for e in moe.experts])

    padded, unpadded = run(512), run(10 ** 9)
    for a, b in zip(padded, unpadded):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02 * b.abs().max().item())
    assert padded[2][0].abs().sum() == 0          # the expert with no pair gets no gradient from the padding


def test_fused_qkv_matches_separate_projections():
    torch.manual_seed(0)
    attn = Attention(NemotronHConfig.from_dict({**CONFIG, "attention_bias": True}), 1)
    plain = copy.deepcopy(attn)
    x = torch.randn(2 * 5, 32)
    ctx = ForwardContext.for_full_forward(2, 5)
    with torch.no_grad():
        want = torch.cat([p(x) for p in (plain.q_proj, plain.k_proj, plain.v_proj)], dim=-1)
        got = torch.cat(attn._project_qkv(x), dim=-1)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(attn(x, ctx), plain.forward(x, ctx))


def test_closed_form_steps_match_the_recurrence():
    torch.manual_seed(0)
    inputs = _scan_inputs(b=3, t=4, h=8, p=16, n=32, g=2)
    _assert_matches_recurrence(ssd_steps(*inputs), *inputs)


def test_large_state_steps_match_the_recurrence():
    """Past 512 KiB of states ssd_steps switches to in-place sequential steps: same results."""
    torch.manual_seed(1)
    inputs = _scan_inputs(b=2, t=4, h=16, p=32, n=128, g=2)
    assert inputs[0].numel() * 4 * 4 > SSD_STEPS_BATCHED_MAX_BYTES
    before = inputs[0].clone()
    result = ssd_steps(*inputs)
    assert torch.equal(inputs[0], before)                  # the caller's state is not touched
    _assert_matches_recurrence(result, *inputs)


def test_closed_form_steps_survive_decays_that_overflow():
    """exp(c_t - c_s) above the diagonal (s > t) overflows for a steep decay; those entries are unused and
    must not turn into NaN."""
    torch.manual_seed(2)
    state, x, dt, _, B, C = _scan_inputs(b=1, t=6, h=8, p=16, n=32, g=2)
    A = torch.full((8,), -2000.0)
    result = ssd_steps(state, x, dt + 0.05, A, B, C)
    assert torch.isfinite(result[0]).all() and torch.isfinite(result[1]).all()
    _assert_matches_recurrence(result, state, x, dt + 0.05, A, B, C)


def _assert_matches_recurrence(result, state, x, dt, A, B, C):
    """ssd_steps' (y, states) against one ssd_step per position."""
    s, ys, want = state.clone(), [], []
    for i in range(x.shape[1]):
        out, s = ssd_step(s, x[:, i], dt[:, i], A, B[:, i], C[:, i])
        ys.append(out)
        want.append(s)
    torch.testing.assert_close(result[0], torch.stack(ys, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result[1], torch.stack(want, 1), rtol=1e-5, atol=1e-5)


def _scan_inputs(b, t, h, p, n, g):
    """(state, x, dt, A, B, C) for `b` sequences of `t` steps, `h` heads in `g` groups."""
    return (torch.randn(b, h, p, n), torch.randn(b, t, h, p), torch.rand(b, t, h) * 0.1, -torch.rand(h) * 4,
            torch.randn(b, t, g, n), torch.randn(b, t, g, n))

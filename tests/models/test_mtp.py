"""The MTP block against a direct transcription of REFERENCE §1's MTP definition, written here from the raw
checkpoint tensors without any nemoh module."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import nemoh
from nemoh.models.forward_context import ForwardContext
from test_cached_forward import Caches


def rms(x, w, eps=1e-5):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def attention(x, t, p, cfg):
    """Causal GQA with no positional encoding; x: (T, hidden)."""
    T = x.shape[0]
    nh, kvh, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    q = (x @ t[p + "q_proj.weight"].T).view(T, nh, hd)
    k = (x @ t[p + "k_proj.weight"].T).view(T, kvh, hd).repeat_interleave(nh // kvh, 1)
    v = (x @ t[p + "v_proj.weight"].T).view(T, kvh, hd).repeat_interleave(nh // kvh, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * hd ** -0.5
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, nh * hd)
    return out @ t[p + "o_proj.weight"].T


def moe(x, t, p, cfg):
    """LatentMoE token by token, exactly as REFERENCE §1 lists the steps."""
    E, G, kg, k = cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"]
    out = []
    for xi in x:
        s = torch.sigmoid(t[p + "gate.weight"].float() @ xi)
        choice = s + t[p + "gate.e_score_correction_bias"]
        groups = choice.view(G, E // G)
        group_score = groups.topk(2, dim=-1).values.sum(-1)
        kept = set(group_score.topk(kg).indices.tolist())
        allowed = torch.tensor([e // (E // G) in kept for e in range(E)])
        chosen = choice.masked_fill(~allowed, float("-inf")).topk(k).indices
        w = s[chosen]
        w = w / (w.sum() + 1e-20) * cfg["routed_scaling_factor"]
        u = t[p + "fc1_latent_proj.weight"] @ xi
        routed = sum(wj * (t[p + f"experts.{e}.down_proj.weight"]
                           @ torch.relu(t[p + f"experts.{e}.up_proj.weight"] @ u) ** 2)
                     for e, wj in zip(chosen.tolist(), w))
        routed = t[p + "fc2_latent_proj.weight"] @ routed
        shared = t[p + "shared_experts.down_proj.weight"] @ torch.relu(t[p + "shared_experts.up_proj.weight"] @ xi) ** 2
        out.append(routed + shared)
    return torch.stack(out)


def mtp_reference(tokens, hidden, t, cfg):
    """tokens: (T,) the next tokens, hidden: (T, hidden) the main model's hidden states after norm_f."""
    e = t["backbone.embeddings.weight"][tokens]
    x = torch.cat([rms(e, t["mtp.layers.0.enorm.weight"]), rms(hidden, t["mtp.layers.0.hnorm.weight"])], -1)
    x = x @ t["mtp.layers.0.eh_proj.weight"].T
    x = x + attention(rms(x, t["mtp.layers.0.norm.weight"]), t, "mtp.layers.0.mixer.", cfg)
    x = x + moe(rms(x, t["mtp.layers.1.norm.weight"]), t, "mtp.layers.1.mixer.", cfg)
    return rms(x, t["mtp.layers.1.final_layernorm.weight"])


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    model = nemoh.load_model(tiny_checkpoint, dtype="float32")
    tensors = {}
    for f in ("model.safetensors", "model-mtp.safetensors"):
        tensors.update(load_file(str(tiny_checkpoint / f)))
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    return model, tensors, cfg


def test_mtp_step_matches_reference_transcription(setup):
    model, t, cfg = setup
    seq = torch.randint(3, 4096, (12,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = model.forward_hidden(seq, ForwardContext.for_full_forward(1, 12))
        # position i pairs the main model's hidden at i with the token at i + 1
        ours = model.mtp_forward(seq[1:], hidden[:-1], ForwardContext.for_full_forward(1, 11))
        ref = mtp_reference(seq[1:], hidden[:-1], t, cfg)
        err = ((ours - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-4
        logits_err = (model.compute_logits(ours) - ref @ t["lm_head.weight"].T).abs().max()
        assert logits_err <= 1e-4 * (ref @ t["lm_head.weight"].T).abs().max()
        # asking for some rows only gives those rows of the same result
        some = model.mtp_forward(seq[1:], hidden[:-1], ForwardContext.for_full_forward(1, 11), rows=[3, 10])
        torch.testing.assert_close(some, ours[[3, 10]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("last_row_only", [False, True])
def test_repeated_mtp_drafts_with_cache_match_reference(setup, last_row_only):
    """Draft k tokens greedily: each step feeds the previous MTP output and the token it predicted. With
    `last_row_only` the prefix pass asks for its last row only, as the proposer does: the MTP's attention
    cache must still be filled for every position, or the later drafts differ."""
    model, t, cfg = setup
    seq = torch.randint(3, 4096, (10,), generator=torch.Generator().manual_seed(4))
    k = 3
    with torch.no_grad():
        hidden = model.forward_hidden(seq, ForwardContext.for_full_forward(1, 10))
        next_token = int(model.compute_logits(hidden[-1:]).argmax())
        # reference: MTP over the whole prefix, then k-1 more steps appended, without any cache
        toks, hs = torch.cat([seq[1:], torch.tensor([next_token])]), hidden.clone()
        ref_drafts = []
        for _ in range(k):
            out = mtp_reference(toks, hs, t, cfg)
            draft = int((out[-1] @ t["lm_head.weight"].T).argmax())
            ref_drafts.append(draft)
            toks, hs = torch.cat([toks, torch.tensor([draft])]), torch.cat([hs, out[-1:]])
        # nemoh with the MTP attention cache: prefix once, then one token per step
        caches = Caches(model, 1, 32)
        ctx = caches.context([0], [10])
        ours = model.mtp_forward(toks[:10], hidden, ctx, rows=[9] if last_row_only else None)
        caches.lens[0] = 10
        drafts = []
        for _ in range(k):
            draft = int(model.compute_logits(ours[-1:]).argmax())
            drafts.append(draft)
            ctx = caches.context([0], [1])
            ours = model.mtp_forward(torch.tensor([draft]), ours[-1:], ctx)
            caches.lens[0] += 1
    assert drafts == ref_drafts

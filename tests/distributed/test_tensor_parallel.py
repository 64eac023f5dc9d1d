"""TP2 and TP2 + expert parallel on two gloo processes: the logits (main model and MTP) equal one rank's, in
float32, for plain, NVFP4 and FP8 checkpoints."""
from __future__ import annotations

import pytest
import torch

from ranks import run_ranks

CASES = [("f32", False), ("f32", True), ("nvfp4", False), ("nvfp4", True), ("fp8", False), ("fp8", True)]


def model_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(main logits (b, t, V), MTP logits (b, t-1, V)) of a full forward without cache."""
    from nemoh.models.forward_context import ForwardContext

    b, t = ids.shape
    with torch.inference_mode():
        ctx = ForwardContext.for_full_forward(b, t)
        hidden = model.forward_hidden(ids.reshape(-1), ctx)
        logits = model.compute_logits(hidden).view(b, t, -1)
        # MTP input at position j: (token j+1, hidden j)
        ctx = ForwardContext.for_full_forward(b, t - 1)
        mtp = model.mtp_forward(ids[:, 1:].reshape(-1), hidden.view(b, t, -1)[:, :-1].reshape(b * (t - 1), -1), ctx)
        return logits, model.compute_logits(mtp).view(b, t - 1, -1)


def _rank_logits(rank, tp, paths, ids):
    from nemoh.config import NemotronHConfig
    from nemoh.distributed.layout import ParallelLayout
    from nemoh.loader import load_model

    out = {}
    for kind, ep in CASES:
        tp.vocab_size = NemotronHConfig.from_pretrained(paths[kind]).vocab_size
        model = load_model(paths[kind], dtype="float32", layout=ParallelLayout(tp.world_size, rank, ep), tp=tp)
        out[kind, ep] = model_logits(model, ids)
    return out


@pytest.fixture(scope="module")
def tp2_logits(tp_checkpoints, tmp_path_factory):
    ids = torch.randint(0, 4096, (2, 11), generator=torch.Generator().manual_seed(0))
    return ids, run_ranks(_rank_logits, 2, tmp_path_factory.mktemp("ranks"), tp_checkpoints, ids)


@pytest.mark.parametrize("kind, ep", CASES)
def test_tp2_logits_equal_one_rank(tp_checkpoints, tp2_logits, kind, ep):
    from nemoh.loader import load_model

    ids, ranks = tp2_logits
    model = load_model(tp_checkpoints[kind], dtype="float32")
    assert model.mtp is not None and model.config.num_key_value_heads < 2
    want = model_logits(model, ids)
    for rank in ranks:
        for got, ref in zip(rank[kind, ep], want):
            assert got.shape == ref.shape
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            assert err <= 1e-5, (kind, ep, err)
    assert torch.equal(ranks[0][kind, ep][0], ranks[1][kind, ep][0])       # every rank holds the same logits

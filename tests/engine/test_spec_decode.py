"""MTP speculative decoding: the proposer against an uncached MTP oracle, and verification + Mamba rollback
with drafts that are right for a chosen number of positions."""
import pytest
import torch
from engine_helpers import PROMPTS, assert_idle, greedy

from nemoh.engine.spec_decode import DraftRequest
from nemoh.models.forward_context import ForwardContext
from nemoh.sampling_params import SamplingParams

SPEC = {"method": "mtp", "num_speculative_tokens": 3}


def reference_drafts(model, token_ids: list[int], k: int) -> list[int]:
    """Drafts for the sequence `token_ids` (last token sampled, not yet computed), without any cache."""
    with torch.inference_mode():
        n = len(token_ids) - 1
        hidden = model.forward_hidden(torch.tensor(token_ids[:n]), ForwardContext.for_full_forward(1, n))
        ids, drafts = list(token_ids[1:]), []
        for _ in range(k):
            m = len(ids)
            mh = model.mtp_forward(torch.tensor(ids), hidden, ForwardContext.for_full_forward(1, m))
            d = int(torch.argmax(model.compute_logits(mh[-1:]), dim=-1))
            drafts.append(d)
            ids.append(d)
            hidden = torch.cat([hidden, mh[-1:]])
    return drafts


@pytest.mark.parametrize("budget", [2048, 7])
def test_mtp_drafts_match_an_uncached_oracle(make_llm, budget):
    llm = make_llm(speculative_config=SPEC, max_num_batched_tokens=budget)
    engine = llm.engine
    engine.add_request("a", prompt_token_ids=PROMPTS[2], params=greedy(12))
    checked = 0
    while engine.has_unfinished_requests():
        engine.step()
        seq = engine.requests["a"].seqs[0] if "a" in engine.requests else None
        if seq is None or seq.num_output_tokens == 0 or seq.is_finished:
            continue
        assert seq.draft_token_ids == reference_drafts(engine.model, seq.token_ids, 3)
        checked += 1
    assert checked >= 5
    assert_idle(engine)


class OracleProposer:
    """Proposes the true greedy continuation, corrupted after a cycling number of correct positions."""

    def __init__(self, refs: dict, k: int, vocab: int):
        self.refs, self.k, self.vocab, self.calls = refs, k, vocab, 0

    def propose(self, requests: list[DraftRequest]) -> None:
        for r in requests:
            seq = r.seq
            seq.draft_token_ids = []
            if not r.needs_draft:
                continue
            ref = self.refs[tuple(seq.prompt_token_ids)]
            n_out = seq.num_output_tokens
            truth = (ref + [0] * self.k)[n_out:n_out + self.k]
            good = self.calls % (self.k + 1)
            self.calls += 1
            seq.draft_token_ids = [t if j < good else (t + 1) % self.vocab for j, t in enumerate(truth)]


def test_verification_and_rollback_with_partly_right_drafts(make_llm, greedy_ref):
    llm = make_llm(speculative_config=SPEC)
    engine = llm.engine
    engine.proposer = OracleProposer({tuple(p): r for p, r in zip(PROMPTS, greedy_ref)}, 3, engine.model_config.vocab_size)
    outs = llm.generate(PROMPTS, greedy())
    assert [o.outputs[0].token_ids for o in outs] == greedy_ref
    stats = engine.stats()
    assert stats["spec_accepted_tokens_total"] > 0
    assert 1.5 < stats["spec_mean_accepted_length"] < 4.0
    assert_idle(engine)


def test_spec_decode_with_sampling_penalties_and_logprobs(make_llm, greedy_ref):
    """Seeded sampling with penalties and logprobs runs under verification and is reproducible."""
    llm = make_llm(speculative_config=SPEC)
    engine = llm.engine
    engine.proposer = OracleProposer({tuple(p): r for p, r in zip(PROMPTS, greedy_ref)}, 3, engine.model_config.vocab_size)
    params = SamplingParams(temperature=0.3, seed=11, max_tokens=16, ignore_eos=True, logprobs=2,
                            repetition_penalty=1.2, presence_penalty=0.1)
    a = llm.generate([PROMPTS[0]], params)[0].outputs[0]
    b = llm.generate([PROMPTS[0], PROMPTS[1]], [params, greedy()])[0].outputs[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 16
    assert len(a.logprobs) == 16 and all(t in lp for t, lp in zip(a.token_ids, a.logprobs))
    assert engine.stats()["spec_accepted_tokens_total"] > 0
    # greedy with a repetition penalty: speculative and plain decoding agree
    pen = greedy(16, repetition_penalty=1.5, frequency_penalty=0.5)
    plain = make_llm().generate(PROMPTS[:2], pen)
    spec = llm.generate(PROMPTS[:2], pen)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]

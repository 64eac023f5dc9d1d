"""Sampler: penalties, min_tokens, top-k/top-p/min-p, seeded reproducibility, logprobs, rejection sampling."""
import math

import pytest
import torch

from nemoh.engine.sampler import Sampler, SamplingRow, compute_logprobs, greedy_verify, rejection_sample
from nemoh.sampling_params import SamplingParams


def row(params, prompt=(), output=(), gen=None):
    return SamplingRow(params, list(prompt), list(output), gen)


def test_greedy_and_penalties():
    s = Sampler(vocab_size=4, eos_token_ids=[3])
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    assert s.sample(logits, [row(SamplingParams(temperature=0))]) == [1]
    # repetition penalty 4 on token 1 (seen in the prompt): 2.0 / 4 = 0.5 < 1.0
    assert s.sample(logits, [row(SamplingParams(temperature=0, repetition_penalty=4.0), prompt=[1])]) == [0]
    # frequency penalty counts output occurrences: 2.0 - 2 * 1.0 = 0 < 1.0 ... and 0.5 stays
    assert s.sample(logits, [row(SamplingParams(temperature=0, frequency_penalty=1.0), output=[1, 1])]) == [0]
    # presence penalty: 2.0 - 1.5 = 0.5 < 1.0
    assert s.sample(logits, [row(SamplingParams(temperature=0, presence_penalty=1.5), output=[1])]) == [0]
    # repetition penalty on a negative logit multiplies
    p = s.process(logits, [row(SamplingParams(repetition_penalty=2.0), output=[3])])
    assert p[0, 3] == -2.0


def test_min_tokens_suppresses_eos_and_stop_ids():
    s = Sampler(vocab_size=4, eos_token_ids=[3])
    logits = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2])
    assert s.sample(logits, [row(params, output=[0])]) == [0]
    assert s.sample(logits, [row(params, output=[0, 0])]) == [3]
    params = SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)
    assert s.sample(logits, [row(params, output=[])]) == [3]     # eos is not a stop with ignore_eos


def test_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = Sampler.probs(logits[None], [row(SamplingParams(top_k=2))])[0]
    assert torch.allclose(probs, torch.tensor([0.625, 0.375, 0, 0]), atol=1e-6)
    probs = Sampler.probs(logits[None], [row(SamplingParams(top_p=0.7))])[0]
    assert torch.allclose(probs, torch.tensor([0.625, 0.375, 0, 0]), atol=1e-6)
    probs = Sampler.probs(logits[None], [row(SamplingParams(top_p=0.5))])[0]
    assert torch.allclose(probs, torch.tensor([1.0, 0, 0, 0]), atol=1e-6)
    probs = Sampler.probs(logits[None], [row(SamplingParams(min_p=0.5))])[0]
    assert torch.allclose(probs, torch.tensor([0.625, 0.375, 0, 0]), atol=1e-6)
    probs = Sampler.probs(logits[None], [row(SamplingParams(temperature=0.5))])[0]
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    assert torch.allclose(probs, expected / expected.sum(), atol=1e-6)


def test_seeded_sampling_is_independent_of_the_batch():
    s = Sampler(vocab_size=50, eos_token_ids=[0], seed=123)
    torch.manual_seed(0)
    logits = torch.randn(3, 50)

    def draws(batch_rows, target):
        gen = torch.Generator().manual_seed(7)
        rows = [row(SamplingParams(seed=7)) if i == target else row(SamplingParams()) for i in range(batch_rows)]
        rows[target].generator = gen
        out = []
        for _ in range(20):
            lg = logits[:batch_rows].clone()
            lg[target] = logits[0]
            out.append(s.sample(lg, rows)[target])
        return out

    assert draws(1, 0) == draws(3, 2) == draws(2, 1)


def test_sampling_matches_distribution():
    s = Sampler(vocab_size=4, eos_token_ids=[0])
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[s.sample(logits, [row(SamplingParams(), gen=gen)])[0]] += 1
    assert (counts / 4000 - torch.tensor([0.1, 0.2, 0.3, 0.4])).abs().max() < 0.03


def test_logprobs_rank_and_top():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    out = compute_logprobs(logits, [2], [2])[0]
    assert set(out) == {2, 1}
    assert out[2].rank == 2 and math.isclose(out[2].logprob, math.log(0.3), rel_tol=1e-5)
    assert out[1].rank == 1
    assert set(compute_logprobs(logits, [0], [0])[0]) == {0}


def test_greedy_verify():
    assert greedy_verify([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]
    assert greedy_verify([5, 6, 7, 8], [5, 9, 7]) == [5, 6]
    assert greedy_verify([5, 6, 7, 8], [1, 6, 7]) == [5]


@pytest.mark.parametrize("deterministic_draft", [False, True])
def test_rejection_sampling_preserves_target_distribution(deterministic_draft):
    """The first emitted token of verification must be distributed as p, whatever q proposes."""
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    q = torch.tensor([0.4, 0.1, 0.3, 0.1, 0.1])
    gen = torch.Generator().manual_seed(0)
    uniform = lambda: float(torch.rand((), generator=gen))
    draw = lambda probs: int(torch.multinomial(probs, 1, generator=gen))
    trials = 20000
    counts = torch.zeros(5)
    target = torch.stack([p, p])
    for _ in range(trials):
        if deterministic_draft:
            d, dq = 2, None                       # argmax-style proposal: q is one-hot at the draft
        else:
            d, dq = draw(q), q[None]
        counts[rejection_sample(target, [d], dq, uniform, draw)[0]] += 1
    freq = counts / trials
    tv = 0.5 * float((freq - p).abs().sum())
    assert tv < 0.02, (freq, tv)
    chi2 = float(((counts - trials * p) ** 2 / (trials * p)).sum())
    assert chi2 < 20.5, chi2                  # 4 degrees of freedom, p = 0.0004

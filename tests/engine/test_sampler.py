"""Sampler: penalties, min_tokens, top-k/top-p/min-p, seeded reproducibility, logprobs, rejection sampling; the
batched paths against the per-row reference."""
import math

import pytest
import torch

import nemoh.engine.sampler as sampler_module
from nemoh.engine.sampler import (Sampler, SamplingRow, _row_logprobs, _row_probs, _row_process, compute_logprobs,
                                  greedy_verify, rejection_sample)
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


@pytest.mark.parametrize("temperature", [1e-5, 1.0])
def test_extreme_penalties_keep_the_distribution_finite(temperature):
    """repetition_penalty 1e-300 is a float32 0: the seen tokens' logits would be inf or nan (found by schema
    fuzzing, where the draw then failed); they stay finite and the highest seen logit wins."""
    s = Sampler(vocab_size=4, eos_token_ids=[3])
    logits = torch.tensor([[1.0, 2.0, 0.0, -1.0]])
    rows = [row(SamplingParams(temperature=temperature, repetition_penalty=1e-300), output=[0, 1, 2, 3])]
    processed = s.process(logits, rows)
    probs = s.probs(processed, rows)
    assert not torch.isnan(processed).any() and torch.isfinite(probs).all()
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-6)
    assert s.sample(logits, rows) in ([0], [1])


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


# ---- the batched paths against the per-row reference ------------------------------------------------
VOCAB = 300

# every filter alone and combined, greedy rows with filters (ignored), a top-k at the vocabulary (disabled)
MIXED = [SamplingParams(temperature=0), SamplingParams(), SamplingParams(temperature=0.5), SamplingParams(top_k=5),
         SamplingParams(top_k=1), SamplingParams(top_k=VOCAB), SamplingParams(top_p=0.9),
         SamplingParams(top_p=0.01), SamplingParams(min_p=0.1),
         SamplingParams(temperature=1.5, top_k=40, top_p=0.8, min_p=0.02),
         SamplingParams(temperature=0.7, top_p=0.95, min_p=0.3), SamplingParams(temperature=0, top_k=3, top_p=0.5),
         SamplingParams(temperature=2.0, top_k=10), SamplingParams(temperature=0.3, top_k=20, top_p=0.6)]


def mixed_logits(n, ties, seed=0):
    """(n, VOCAB) logits; with ties, on a coarse grid so that many tokens share a value."""
    logits = torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    return torch.round(logits) if ties else logits


def reference_probs(logits, rows):
    return torch.stack([_row_probs(logits[i], r.params) for i, r in enumerate(rows)])


@pytest.mark.parametrize("ties", [False, True])
def test_batched_probs_equal_the_per_row_reference(ties):
    rows = [row(p) for p in MIXED]
    logits = mixed_logits(len(rows), ties)
    got, ref = Sampler.probs(logits, rows), reference_probs(logits, rows)
    assert torch.equal(logits, mixed_logits(len(rows), ties))      # the stages work in place on their own copy
    assert torch.equal(got > 0, ref > 0)                 # the same tokens survive every filter, ties included
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    # a batch of one kind only (no greedy, no random rows) and a single row take other branches
    for subset in ([r for r in rows if r.is_greedy], [r for r in rows if not r.is_greedy], rows[6:7]):
        idx = [rows.index(r) for r in subset]
        torch.testing.assert_close(Sampler.probs(logits[idx], subset), ref[idx], rtol=1e-6, atol=1e-7)


def test_top_p_ties_rank_by_token_id():
    """Equal logits at the nucleus boundary: the lower ids are kept, in the batch as in the reference."""
    logits = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.4]]))
    rows = [row(SamplingParams(top_p=0.7)), row(SamplingParams(top_p=0.7))]
    expected = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.0, 0.5]])
    torch.testing.assert_close(Sampler.probs(logits, rows), expected)
    torch.testing.assert_close(reference_probs(logits, rows), expected)


@pytest.mark.parametrize("ties", [False, True])
def test_top_p_among_the_candidates_equals_the_full_sort(monkeypatch, ties):
    """With 16 candidates out of 300, some rows' nucleus lies among them (the top-k finds it), others' reaches
    past them (those rows are sorted in full); both equal the reference, ties at the candidates' edge included."""
    monkeypatch.setattr(sampler_module, "TOP_P_CANDIDATES", 16)
    sorted_rows = []
    full_sort = sampler_module._top_p_sorted_
    monkeypatch.setattr(sampler_module, "_top_p_sorted_", lambda lg, p: sorted_rows.append(len(lg)) or full_sort(lg, p))
    params = [SamplingParams(top_p=q, temperature=t) for q, t in
              [(0.1, 0.3), (0.5, 1.0), (0.9, 0.5), (0.95, 2.0), (0.3, 0.1), (0.99, 1.0), (0.6, 0.2)]]
    rows = [row(p) for p in params] + [row(SamplingParams(top_p=0.9, top_k=12)), row(SamplingParams(top_p=0.1)),
                                       row(SamplingParams(top_p=0.5))]
    logits = mixed_logits(len(rows), ties)
    # a hundred tied tokens across the candidates' edge, the cut among them: the top-k takes some of them, not
    # necessarily those of the lowest ids, which the nucleus keeps
    logits[-2] = -10.0
    logits[-2, 100:200], logits[-2, 250] = 3.0, 5.0
    logits[-1] = 1.0                                  # every token tied: the candidates cannot hold the nucleus
    got, ref = Sampler.probs(logits, rows), reference_probs(logits, rows)
    assert torch.equal(got > 0, ref > 0)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    assert 0 < sorted_rows[0] < len(rows) - 3
    assert ref[-2].nonzero()[:, 0].tolist() == [100, 101, 102, 103, 250]
    assert ref[-1].count_nonzero() == 150 and ref[-1, :150].all()


def test_top_p_at_nemotrons_vocabulary_keeps_the_same_tokens_by_candidates_and_by_full_sort():
    """Over 131072 tokens a float32 sum of probabilities is off by more than the probability of a token at the
    cut; the masses are summed in float64, so that both ways keep the same tokens."""
    logits = torch.randn(8, 131072, generator=torch.Generator().manual_seed(0)) * 4
    top_p = torch.full((8, 1), 0.9, dtype=torch.float64)
    cut = sampler_module._top_p_(logits.clone(), top_p)
    assert torch.equal(cut, sampler_module._top_p_sorted_(logits.clone(), top_p))
    assert 100 < int(cut.isfinite().sum(-1).min()) and int(cut.isfinite().sum(-1).max()) < 1000


def penalty_rows():
    """Rows with every penalty alone and combined, ids outside the vocabulary, and min_tokens on and off."""
    prompt = [3, 4, 4, VOCAB + 7, 250]
    output = [1, 1, 1, 5, 4, 299, VOCAB + 3]
    return [
        row(SamplingParams()),
        row(SamplingParams(repetition_penalty=1.3), prompt, output),
        row(SamplingParams(repetition_penalty=0.7), [], []),
        row(SamplingParams(frequency_penalty=0.5), prompt, output),
        row(SamplingParams(presence_penalty=-0.7), prompt, output),
        row(SamplingParams(repetition_penalty=2.0, frequency_penalty=-1.5, presence_penalty=1.1), prompt, output),
        row(SamplingParams(min_tokens=3, stop_token_ids=[7, VOCAB + 5]), prompt, output[:2]),
        row(SamplingParams(min_tokens=3, stop_token_ids=[8], ignore_eos=True, frequency_penalty=0.2), prompt, [9]),
        row(SamplingParams(min_tokens=3, stop_token_ids=[7]), prompt, output),        # min_tokens reached
        row(SamplingParams(temperature=0, repetition_penalty=1.5, min_tokens=2), list(range(100)), []),
    ]


def test_batched_process_equals_the_per_row_reference():
    s = Sampler(vocab_size=VOCAB, eos_token_ids=[0, 2])
    rows = penalty_rows()
    logits = mixed_logits(len(rows), ties=False)
    got = s.process(logits, rows)
    ref = torch.stack([_row_process(logits[i], r, s.eos_token_ids) for i, r in enumerate(rows)])
    assert torch.equal(got, ref) and torch.equal(logits, mixed_logits(len(rows), ties=False))
    assert not torch.equal(got, logits)               # the rows above do change the logits
    assert torch.equal(s.process(logits[:1], rows[:1]), logits[:1])


def test_batched_greedy_tokens_equal_the_reference_argmax():
    s = Sampler(vocab_size=VOCAB, eos_token_ids=[0, 2])
    rows = [r for r in penalty_rows()] + [row(p) for p in MIXED]
    for r in rows:
        r.params = SamplingParams(**{**r.params.__dict__, "temperature": 0.0})
    logits = mixed_logits(len(rows), ties=True)       # ties: the first maximal id, as torch.argmax
    ref = [int(torch.argmax(_row_process(logits[i], r, s.eos_token_ids))) for i, r in enumerate(rows)]
    assert s.sample(logits, rows) == ref
    assert len(set(ref)) > 3


def seeded_params():
    return [SamplingParams(seed=1), SamplingParams(temperature=0.7, top_p=0.9, seed=2),
            SamplingParams(top_k=7, min_p=0.05, repetition_penalty=1.2, seed=3),
            SamplingParams(temperature=1.4, top_k=30, top_p=0.8, frequency_penalty=0.3, seed=4)]


def test_seeded_rows_draw_what_the_per_row_path_draws_whatever_the_batch():
    """A seeded row gets the tokens the per-row path (process, probs, multinomial) gave it before batching,
    alone or among greedy, unseeded and other seeded rows."""
    s = Sampler(vocab_size=VOCAB, eos_token_ids=[0])
    steps = 12
    logits = [mixed_logits(8, ties=False, seed=step) for step in range(steps)]

    def run(batched, layout):
        """layout: for each batch position, an index into seeded_params() or None for a filler row."""
        params = seeded_params()
        gens = {i: torch.Generator().manual_seed(params[i].seed) for i in layout if i is not None}
        fillers = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_p=0.5)]
        out = {i: [] for i in gens}
        history = {i: [] for i in gens}
        for step in range(steps):
            rows = [row(fillers[j % 3]) if i is None else row(params[i], [5, 6], history[i], gens[i])
                    for j, i in enumerate(layout)]
            # a seeded row's logits follow it to its place in the batch; fillers take the spare rows
            lg = logits[step][[4 + j % 4 if i is None else i for j, i in enumerate(layout)]]
            if batched:
                tokens = s.sample(lg, rows)
            else:
                tokens = [s.draw(_row_probs(_row_process(lg[j], r, s.eos_token_ids), r.params), r)
                          for j, r in enumerate(rows)]
            for j, i in enumerate(layout):
                if i is not None:
                    out[i].append(tokens[j])
                    history[i].append(tokens[j])
        return out

    reference = run(False, [0, 1, 2, 3])
    assert run(True, [0, 1, 2, 3]) == reference
    mixed = run(True, [None, 2, None, 0, 3, None, 1, None])
    assert mixed == reference
    for i in range(4):
        assert run(True, [None, i]) == {i: reference[i]}
    assert len({tuple(v) for v in reference.values()}) == 4


def test_unseeded_batched_sampling_follows_the_reference_probs():
    """Each setting, repeated over a batch of 4000 rows and drawn in one call, lands on the reference distribution
    (chi-square over the tokens the reference keeps; none outside them)."""
    vocab, reps = 12, 4000
    settings = [SamplingParams(), SamplingParams(temperature=0.6, top_k=6), SamplingParams(top_p=0.7),
                SamplingParams(temperature=1.7, min_p=0.08), SamplingParams(temperature=0.9, top_k=8, top_p=0.9)]
    s = Sampler(vocab_size=vocab, eos_token_ids=[0], seed=0)
    base = torch.randn(len(settings), vocab, generator=torch.Generator().manual_seed(1)) * 1.5
    rows = [row(p) for p in settings for _ in range(reps)]
    tokens = torch.tensor(s.sample(base.repeat_interleave(reps, 0), rows)).view(len(settings), reps)
    for i, p in enumerate(settings):
        expected = _row_probs(base[i], p)
        counts = torch.bincount(tokens[i], minlength=vocab).double()
        keep = expected > 0
        assert counts[~keep].sum() == 0, p
        e = reps * expected[keep].double()
        chi2 = float(((counts[keep] - e) ** 2 / e).sum())
        assert chi2 < 32.9, (p, chi2)          # at most 11 degrees of freedom, p = 0.0005
        assert (counts / reps - expected).abs().max() < 0.03


def test_batched_logprobs_equal_the_per_row_reference():
    logits = mixed_logits(6, ties=False)
    logits[5, :10] = 20.0                           # ten tokens tied at the top
    tokens = [int(logits[0].argmax()), 17, int(logits[2].argmin()), 3, 200, 4]
    num_top = [0, 1, 3, 20, 5, 4]
    got = compute_logprobs(logits, tokens, num_top)
    ref = [_row_logprobs(logits[i], tokens[i], num_top[i]) for i in range(6)]
    assert [list(g.items()) for g in got] == [list(r.items()) for r in ref]
    assert [len(g) for g in got[:5]] == [1, 2, 4, 21, 6]
    assert got[5][4].rank == 1 and len(got[5]) in (4, 5)      # tied first: all rank 1; the top 4 are 4 of them
    assert got[2][tokens[2]].rank == VOCAB and compute_logprobs(logits[:0], [], []) == []

"""Turning logits into tokens: penalties, min_tokens, temperature / top-k / top-p / min-p, seeded sampling,
logprobs, grammar masks (constrained decoding, see guided.py), and the rejection sampler that verifies speculative
drafts.

Every row of a logits batch carries its own `SamplingRow` (params, history, generator), so a request's
result never depends on what else is in the batch: a seeded request draws only from its own generator.
Logprobs are those of the raw model distribution (before penalties and temperature), as in vLLM.

The batched paths (`Sampler.process`, `Sampler.probs`, `Sampler.sample`, `compute_logprobs`) gather the rows'
parameters into tensors once and run each stage as one tensor op over the batch; the one per-row loop draws the
noise of seeded rows, each from its own generator. The per-row functions at the end (`_row_process`,
`_row_probs`, `_row_logprobs`) are the reference the batched paths are tested against.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import torch

from nemoh.engine.guided import TokenMasks, apply_token_bitmask_
from nemoh.engine.outputs import Logprob
from nemoh.sampling_params import SamplingParams

_EPS_TEMPERATURE = 1e-5
_MAX_LOGIT = 1e30   # x 1 / _EPS_TEMPERATURE stays below float32's 3.4e38
# top-p looks for the nucleus among this many largest logits of a row before it sorts the whole row
TOP_P_CANDIDATES = 1024


@dataclass
class SamplingRow:
    """What one logits row needs to be sampled."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]          # generated before this row (incl. accepted drafts in verification)
    generator: torch.Generator | None    # None: the sampler's shared generator

    @property
    def is_greedy(self) -> bool:
        return self.params.temperature < _EPS_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], device: torch.device | str = "cpu",
                 seed: int = 0):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    # ---- logits processing --------------------------------------------------------------------------
    def process(self, logits: torch.Tensor, rows: list[SamplingRow], masks: TokenMasks | None = None) -> torch.Tensor:
        """Penalties, min_tokens and grammar masks. logits: (n, vocab) -> a new (n, vocab) float32 tensor."""
        logits = logits.to(torch.float32, copy=True)
        vocab = logits.shape[1]
        penalised = [i for i, row in enumerate(rows) if row.has_penalties]
        if penalised:
            _apply_penalties(logits, penalised, [rows[i] for i in penalised])
            # A repetition penalty near 0 divides by a float32 0 (inf, or nan for a zero logit): keep the logits
            # finite, and small enough that the division by the smallest temperature still is (found by schema
            # fuzzing: repetition_penalty=1e-300 made the draw fail).
            logits.nan_to_num_(nan=float("-inf"), posinf=_MAX_LOGIT).clamp_(max=_MAX_LOGIT)
        masked = [(i, t) for i, row in enumerate(rows) for t in self._min_tokens_stop_ids(row, vocab)]
        if masked:
            row_ids, token_ids = torch.tensor(masked, device=logits.device).T
            logits[row_ids, token_ids] = float("-inf")
        if masks is not None:
            apply_token_bitmask_(logits, masks)
        return logits

    def _min_tokens_stop_ids(self, row: SamplingRow, vocab: int) -> list[int]:
        """The ids a row may not emit yet: its stop ids (and eos) while it has fewer than min_tokens outputs."""
        p = row.params
        if row.output_token_ids is None or len(row.output_token_ids) >= p.min_tokens:
            return []
        stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
        return [t for t in stop_ids if t < vocab]

    @staticmethod
    def probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The sampling distribution of each (processed) row: temperature, top-k, top-p, min-p.

        logits: (n, vocab) float32 -> probs (n, vocab). Greedy rows get the one-hot distribution of their argmax.
        """
        greedy, random = _split(rows)
        if random and not greedy:
            return _random_probs(logits, [row.params for row in rows])
        probs = torch.zeros_like(logits)
        if greedy:
            index = _index(greedy, logits.device)
            probs[index, logits[index].argmax(-1)] = 1.0
        if random:
            index = _index(random, logits.device)
            probs[index] = _random_probs(logits[index], [rows[i].params for i in random])
        return probs

    # ---- sampling -----------------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, rows: list[SamplingRow], masks: TokenMasks | None = None) -> list[int]:
        """logits: (n, vocab) raw model logits -> one token id per row.

        Greedy rows take one argmax over them all; the others one exponential race over them all, fed by noise
        from the shared generator (one op) and, for seeded rows, from their own generators.
        """
        if not rows:
            return []
        logits = self.process(logits, rows, masks)
        greedy, random = _split(rows)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        if greedy:
            index = _index(greedy, logits.device)
            tokens[index] = (logits[index] if random else logits).argmax(-1)
        if random:
            index = _index(random, logits.device)
            probs = _random_probs(logits[index] if greedy else logits, [rows[i].params for i in random])
            tokens[index] = probs.div_(self._exponential_noise(probs, [rows[i] for i in random])).argmax(-1)
        return tokens.tolist()

    def _exponential_noise(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Exp(1) noise (m, vocab) for the exponential race argmax(probs / noise): each row a draw from probs.

        A seeded row's noise comes from its own generator by `exponential_`, which is what torch.multinomial(probs,
        1) computes the race with, so it draws the tokens it drew by multinomial, whatever else is in the batch.
        The others share the sampler's generator and get theirs in one op, as -log(U) with U uniform in [0, 1):
        3 to 4x cheaper than `exponential_` on a CPU, and never 0, so no 0/0 can win the race. (The seeded rows'
        share of it is drawn and overwritten: cheaper than gathering the others.)
        """
        noise = torch.rand(probs.shape, generator=self.generator, device=probs.device).log_().neg_()
        for i, row in enumerate(rows):
            if row.generator is not None:
                noise[i].exponential_(generator=row.generator)
        return noise

    def draw(self, probs: torch.Tensor, row: SamplingRow) -> int:
        """One token from a (vocab,) distribution with the row's generator (argmax for greedy rows)."""
        if row.is_greedy:
            return int(torch.argmax(probs))
        return int(torch.multinomial(probs, 1, generator=row.generator or self.generator))

    def uniform(self, row: SamplingRow) -> float:
        return float(torch.rand((), generator=row.generator or self.generator, device=self.device))


def _split(rows: list[SamplingRow]) -> tuple[list[int], list[int]]:
    """Positions of the greedy rows and of the others."""
    greedy = [i for i, row in enumerate(rows) if row.is_greedy]
    return greedy, [i for i, row in enumerate(rows) if not row.is_greedy]


def _index(positions: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(positions, dtype=torch.long, device=device)


def _positions(token_ids: list[list[int]], rows: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """Flat positions row * vocab + id in an (n, vocab) tensor of every id of each list -> (num_ids,) int64.

    token_ids[j] belongs to row rows[j]; ids outside the vocabulary are left out, as the per-row bincount does.
    """
    ids = torch.tensor(list(chain.from_iterable(token_ids)), dtype=torch.long, device=device)
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.long, device=device)
    row_of = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long, device=device), lengths)
    return (row_of * vocab + ids)[ids < vocab]


def _apply_penalties(logits: torch.Tensor, penalised: list[int], rows: list[SamplingRow]) -> None:
    """Repetition, frequency and presence penalties of the rows `penalised` of logits (n, vocab), in place.

    Only the tokens a row has seen change, so only those are touched: one torch.unique over the flat positions of
    the batch's output ids counts them, and the prompt ids of the rows with a repetition penalty join them with
    no count. A row's disabled penalty is a factor of 1 or a term of 0, which leaves its values bit for bit as
    they are.
    """
    vocab, device = logits.shape[1], logits.device
    outputs = _positions([row.output_token_ids for row in rows], penalised, vocab, device)
    prompts = _positions([row.prompt_token_ids if row.params.repetition_penalty != 1.0 else [] for row in rows],
                         penalised, vocab, device)
    positions, inverse = torch.unique(torch.cat([outputs, prompts]), return_inverse=True)
    counts = torch.zeros(len(positions), device=device).index_add_(
        0, inverse[: len(outputs)], torch.ones(len(outputs), device=device))
    factors = [(1.0, 0.0, 0.0)] * logits.shape[0]         # no penalty: the rows not penalised have no positions
    for i, row in zip(penalised, rows):
        factors[i] = (row.params.repetition_penalty, row.params.frequency_penalty, row.params.presence_penalty)
    repetition, frequency, presence = torch.tensor(factors, device=device)[positions // vocab].T
    flat = logits.view(-1)
    values = flat[positions]
    # every position here was seen (in the output, or in the prompt of a row with a repetition penalty)
    values = torch.where(values > 0, values / repetition, values * repetition)
    flat[positions] = values - frequency * counts - presence * (counts > 0).float()


def _random_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p of m non-greedy rows. logits: (m, vocab) -> a new probs (m, vocab).

    Each stage runs once over the rows that use it (skipped when none does); a row that does not use a stage
    gets a threshold that keeps every token, so it comes out as the reference computes it. From the division
    by the temperature on, the stages work in place: on a CPU each new (64, 131072) tensor costs fresh pages.
    """
    vocab, device = logits.shape[1], logits.device
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    # float64, as the parameters are Python floats; top-p compares the mass in float64 (see `_top_p_`)
    columns = torch.tensor([[p.temperature, p.top_p, p.min_p, k] for p, k in zip(params, top_k)],
                           dtype=torch.float64, device=device)
    temperature, top_p, min_p, k = columns.T[:, :, None]
    logits = logits / temperature.float()
    if any(top_k):
        # the k-th largest logit (ties counted) from one top-k over the batch: cheaper than a sort of the vocab
        kth = logits.topk(max(top_k), dim=-1).values.gather(1, (k.long() - 1).clamp_min(0))
        logits.masked_fill_(logits < kth.masked_fill(k == 0, float("-inf")), float("-inf"))
    _update_rows_(logits, [i for i, p in enumerate(params) if p.top_p < 1.0], _top_p_, top_p)
    probs = logits.softmax(-1)
    _update_rows_(probs, [i for i, p in enumerate(params) if p.min_p > 0.0], _min_p_, min_p.float())
    return probs


def _update_rows_(x: torch.Tensor, rows: list[int], fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  column: torch.Tensor) -> None:
    """x[rows] = fn(x[rows], column[rows]) in place; x (m, vocab), column (m, 1). Without copies for all rows."""
    if len(rows) == x.shape[0]:
        fn(x, column)
    elif rows:
        index = _index(rows, x.device)
        x.index_copy_(0, index, fn(x[index], column[index]))


def _min_p_(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop the tokens less likely than min_p times the row's most likely one, renormalise; in place, returned."""
    probs.masked_fill_(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs.div_(probs.sum(-1, keepdim=True))


def _top_p_(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set the tokens outside each row's nucleus to -inf, in place, and return logits (m, vocab).

    A token is dropped when the tokens strictly before it already reach top_p (the first is always kept);
    equal logits rank by token id, so the cut is the same on every device and in every batch. The masses are
    summed in float64: a float32 sum over 131072 probabilities is off by some 5e-5, more than the probability
    of a token at the cut, and the two ways below would disagree about it. The nucleus is looked for among
    each row's TOP_P_CANDIDATES largest logits first, by a top-k (on a CPU some 8x cheaper than sorting
    Nemotron's vocabulary); only the rows whose nucleus reaches past them are sorted in full.
    top_p: (m, 1) float64.
    """
    num = TOP_P_CANDIDATES
    if logits.shape[1] <= 2 * num:
        return _top_p_sorted_(logits, top_p)
    values, ids = logits.topk(num, dim=-1)
    # 1. the candidates in the order of the full sort: value descending, equal values by id
    ids, by_id = ids.sort(dim=-1)
    values, order = values.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, order)
    # 2. each candidate's probability, and the mass of the candidates before it
    probs = (values.double() - logits.double().logsumexp(-1, keepdim=True)).exp()
    drop = (probs.cumsum(-1) - probs) >= top_p
    # 3. the candidates hold the nucleus when the first of those equal to the smallest candidate value is dropped:
    #    then so is every token at or below that value, candidate or not (ties with it may have been left out)
    num_above = (values > values[:, -1:]).sum(-1, keepdim=True)
    held = drop.gather(1, num_above)[:, 0]
    rest = None if bool(held.all()) else (~held).nonzero()[:, 0]
    if rest is not None:                          # sorted in full before the candidates overwrite the rows
        sorted_rest = _top_p_sorted_(logits[rest], top_p[rest])
    logits.fill_(float("-inf")).scatter_(1, ids, values.masked_fill_(drop, float("-inf")))
    if rest is not None:
        logits.index_copy_(0, rest, sorted_rest)
    return logits


def _top_p_sorted_(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`_top_p_` by one stable sort of the whole vocabulary, in place. logits: (m, vocab), top_p: (m, 1)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    sorted_probs = sorted_logits.double().softmax(-1)
    drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
    return logits.scatter_(1, order, sorted_logits.masked_fill_(drop, float("-inf")))


# ---- logprobs ---------------------------------------------------------------------------------------
def compute_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: list[int]) -> list[dict[int, Logprob]]:
    """logits: (n, vocab) raw -> per row {token: Logprob}: the chosen token, then the top num_top[i] by rank.

    The chosen logprobs and ranks come from one op each over the batch; the top ones from one top-k per distinct
    num_top (at most 21), because a top-k with a larger k may order tied logprobs differently, and a row's result
    must not depend on what else is in its batch.
    """
    if not token_ids:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids, dtype=torch.long, device=logprobs.device)[:, None])
    ranks = ((logprobs > chosen).sum(-1) + 1).tolist()
    top: list[tuple[list[float], list[int]]] = [([], [])] * len(token_ids)
    for k in sorted(set(num_top) - {0}):
        rows = [i for i, n in enumerate(num_top) if n == k]
        values, ids = (logprobs if len(rows) == len(token_ids) else logprobs[_index(rows, logprobs.device)]).topk(k)
        for i, row_values, row_ids in zip(rows, values.tolist(), ids.tolist()):
            top[i] = (row_values, row_ids)
    out = []
    for tok, value, rank, (values, ids) in zip(token_ids, chosen[:, 0].tolist(), ranks, top):
        entry = {tok: Logprob(logprob=value, rank=rank)}
        for r, (t, v) in enumerate(zip(ids, values)):
            if t not in entry:
                entry[t] = Logprob(logprob=v, rank=r + 1)
        out.append(entry)
    return out


# ---- the per-row reference --------------------------------------------------------------------------
def _row_process(logits: torch.Tensor, row: SamplingRow, eos_token_ids: list[int]) -> torch.Tensor:
    """`Sampler.process` for one row, one op per token list. logits: (vocab,) -> a new (vocab,) float32."""
    logits = logits.float().clone()
    p = row.params
    vocab = logits.shape[0]
    if row.has_penalties:
        out = torch.tensor(row.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            if row.prompt_token_ids:
                prompt = torch.tensor(row.prompt_token_ids, dtype=torch.long, device=logits.device)
                seen[prompt[prompt < vocab]] = True
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(seen, penalised, logits)
        if p.frequency_penalty:
            logits -= p.frequency_penalty * counts
        if p.presence_penalty:
            logits -= p.presence_penalty * (counts > 0).to(logits.dtype)
    if row.output_token_ids is not None and len(row.output_token_ids) < p.min_tokens:
        stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else eos_token_ids)
        stop_ids = [t for t in stop_ids if t < vocab]
        if stop_ids:
            logits[stop_ids] = float("-inf")
    return logits


def _row_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """`Sampler.probs` for one row. logits: (vocab,) processed -> probs (vocab,)."""
    if p.temperature < _EPS_TEMPERATURE:
        out = torch.zeros_like(logits)
        out[torch.argmax(logits)] = 1.0
        return out
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[0]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, stable=True)   # equal logits rank by id
        sorted_probs = torch.softmax(sorted_logits.double(), dim=-1)      # float64: see `_top_p_`
        # drop a token when the tokens strictly before it already reach top_p (the first is always kept)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= p.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    return probs


def _row_logprobs(logits: torch.Tensor, token_id: int, num_top: int) -> dict[int, Logprob]:
    """`compute_logprobs` for one row. logits: (vocab,) raw."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    entry = {token_id: Logprob(logprob=float(logprobs[token_id]),
                               rank=int((logprobs > logprobs[token_id]).sum()) + 1)}
    if num_top:
        top = torch.topk(logprobs, num_top)
        for r in range(num_top):
            t = int(top.indices[r])
            if t not in entry:
                entry[t] = Logprob(logprob=float(top.values[r]), rank=r + 1)
    return entry


# ---- speculative verification -----------------------------------------------------------------------
def rejection_sample(target_probs: torch.Tensor, draft_token_ids: list[int], draft_probs: torch.Tensor | None,
                     uniform, draw) -> list[int]:
    """Standard speculative sampling (Leviathan et al. / Chen et al.) for one sequence.

    target_probs: (k + 1, vocab), the target distribution at each draft position plus the bonus position.
    draft_probs: (k, vocab), the distribution each draft was sampled from; None means the drafts were
    chosen deterministically (argmax), i.e. q is one-hot at the draft.
    uniform(): a float in [0, 1); draw(probs) -> token id. Both use the request's own generator.
    Returns the emitted tokens: the accepted drafts followed by one corrected or bonus token.
    """
    out: list[int] = []
    for j, d in enumerate(draft_token_ids):
        p = float(target_probs[j, d])
        q = float(draft_probs[j, d]) if draft_probs is not None else 1.0
        # 1. accept with probability min(1, p/q)
        if q > 0 and uniform() * q < p:
            out.append(d)
            continue
        # 2. rejected: sample from norm(max(p - q, 0))
        if draft_probs is not None:
            residual = (target_probs[j] - draft_probs[j]).clamp_min(0)
        else:
            residual = target_probs[j].clone()
            residual[d] = 0.0
        total = float(residual.sum())
        residual = residual / total if total > 0 else target_probs[j]
        out.append(draw(residual))
        return out
    # 3. every draft accepted: a bonus token from the target's next distribution
    out.append(draw(target_probs[len(draft_token_ids)]))
    return out


def greedy_verify(target_argmax: list[int], draft_token_ids: list[int]) -> list[int]:
    """Greedy verification: accept drafts while they equal the target's argmax; then emit its argmax."""
    out: list[int] = []
    for j, d in enumerate(draft_token_ids):
        if d != target_argmax[j]:
            break
        out.append(d)
    out.append(target_argmax[len(out)])
    return out

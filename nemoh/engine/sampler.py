"""Turning logits into tokens: penalties, min_tokens, temperature / top-k / top-p / min-p, seeded sampling,
logprobs, and the rejection sampler that verifies speculative drafts.

Every row of a logits batch carries its own `SamplingRow` (params, history, generator), so a request's
result never depends on what else is in the batch: a seeded request draws only from its own generator.
Logprobs are those of the raw model distribution (before penalties and temperature), as in vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nemoh.engine.outputs import Logprob
from nemoh.sampling_params import SamplingParams

_EPS_TEMPERATURE = 1e-5


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


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], device: torch.device | str = "cpu",
                 seed: int = 0):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    # ---- logits processing --------------------------------------------------------------------------
    def process(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Penalties and min_tokens. logits: (n, vocab) float32 -> a new (n, vocab) float32 tensor."""
        logits = logits.float().clone()
        for i, row in enumerate(rows):
            p = row.params
            if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
                self._apply_penalties(logits[i], row)
            if row.output_token_ids is not None and len(row.output_token_ids) < p.min_tokens:
                stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
                stop_ids = [t for t in stop_ids if t < logits.shape[1]]
                if stop_ids:
                    logits[i, stop_ids] = float("-inf")
        return logits

    def _apply_penalties(self, row_logits: torch.Tensor, row: SamplingRow) -> None:
        p = row.params
        vocab = row_logits.shape[0]
        out = torch.tensor(row.output_token_ids, dtype=torch.long, device=row_logits.device)
        counts = torch.bincount(out, minlength=vocab)[:vocab].to(row_logits.dtype)
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            if row.prompt_token_ids:
                prompt = torch.tensor(row.prompt_token_ids, dtype=torch.long, device=row_logits.device)
                seen[prompt[prompt < vocab]] = True
            penalised = torch.where(row_logits > 0, row_logits / p.repetition_penalty,
                                    row_logits * p.repetition_penalty)
            row_logits.copy_(torch.where(seen, penalised, row_logits))
        if p.frequency_penalty:
            row_logits -= p.frequency_penalty * counts
        if p.presence_penalty:
            row_logits -= p.presence_penalty * (counts > 0).to(row_logits.dtype)

    @staticmethod
    def probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The sampling distribution of each (processed) row: temperature, top-k, top-p, min-p.

        Greedy rows get the one-hot distribution of their argmax.
        """
        probs = torch.empty_like(logits)
        for i, row in enumerate(rows):
            probs[i] = _row_probs(logits[i], row.params)
        return probs

    # ---- sampling -----------------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
        """logits: (n, vocab) raw model logits -> one token id per row."""
        processed = self.process(logits, rows)
        probs = self.probs(processed, rows)
        return [self.draw(probs[i], row) for i, row in enumerate(rows)]

    def draw(self, probs: torch.Tensor, row: SamplingRow) -> int:
        """One token from a (vocab,) distribution with the row's generator (argmax for greedy rows)."""
        if row.is_greedy:
            return int(torch.argmax(probs))
        return int(torch.multinomial(probs, 1, generator=row.generator or self.generator))

    def uniform(self, row: SamplingRow) -> float:
        return float(torch.rand((), generator=row.generator or self.generator, device=self.device))


def _row_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    if p.temperature < _EPS_TEMPERATURE:
        out = torch.zeros_like(logits)
        out[torch.argmax(logits)] = 1.0
        return out
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[0]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens strictly before it already reach top_p (the first is always kept)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= p.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    return probs


# ---- logprobs ---------------------------------------------------------------------------------------
def compute_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: list[int]) -> list[dict[int, Logprob]]:
    """logits: (n, vocab) raw -> per row {token: Logprob} with the chosen token and the top num_top[i]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out = []
    k = max(num_top) if num_top else 0
    top = torch.topk(logprobs, k, dim=-1) if k > 0 else None
    for i, tok in enumerate(token_ids):
        chosen = float(logprobs[i, tok])
        rank = int((logprobs[i] > logprobs[i, tok]).sum()) + 1
        entry = {tok: Logprob(logprob=chosen, rank=rank)}
        for r in range(num_top[i]):
            t = int(top.indices[i, r])
            if t not in entry:
                entry[t] = Logprob(logprob=float(top.values[i, r]), rank=r + 1)
        out.append(entry)
    return out


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

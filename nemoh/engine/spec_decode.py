"""MTP speculative decoding: drafting with the model's own MTP block, verification bookkeeping, counters.

Positions line up as in vLLM: the MTP input at sequence position t is (token t+1, main-model hidden at t), and
its KV entry is written at position t of the MTP layer's cache (same block table as the main model).

After every main-model step the proposer runs the MTP over all positions the main model newly computed (a
prefill chunk, or the verified tokens up to the last accepted one), so the MTP cache stays complete; the last
of those positions yields the first draft (and only it runs the MTP layers after the MTP's attention). Then
k-1 more drafts are made one token at a time, each feeding the previous MTP hidden state and the previous
draft. Drafts are the MTP's argmax: verification treats the proposal as deterministic (q is one-hot),
which keeps the output distribution exactly the target's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from nemoh.engine.model_runner import ModelRunner
from nemoh.engine.sequence import Sequence


@dataclass
class DraftRequest:
    seq: Sequence
    start: int                  # first position the main model computed this step
    hidden: torch.Tensor        # (m, hidden): main-model hidden at positions start ... start + m - 1
    needs_draft: bool           # False for a prefill chunk that does not reach the end of the prompt
    # right after resuming from the prefix cache: the resume point's hidden, hidden[:1] (tensor parallel workers
    # get it from the driver; nemoh.distributed.worker)
    resumed_hidden: torch.Tensor | None = None


class Proposer(Protocol):
    def propose(self, requests: list[DraftRequest]) -> None:
        """Set `seq.draft_token_ids` of every request with `needs_draft`."""


class MTPProposer:
    def __init__(self, model: torch.nn.Module, runner: ModelRunner, num_speculative_tokens: int):
        if model.config.num_nextn_predict_layers < 1:
            raise ValueError("speculative_config: method 'mtp' needs a checkpoint with an MTP block "
                             "(num_nextn_predict_layers >= 1)")
        self.model = model
        self.runner = runner
        self.k = num_speculative_tokens

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> None:
        captured = self.runner.captured
        if captured is not None and self.k:
            # a decode or verification step's requests draft in the captured MTP steps; prefill chunks do not
            quick = [r for r in requests if r.needs_draft and r.start > 0 and 1 <= r.hidden.shape[0] <= 1 + self.k]
            if quick and captured.takes_drafts([r.hidden.shape[0] for r in quick], [r.start for r in quick]):
                drafts = captured.draft([r.seq for r in quick], [r.start for r in quick], [r.hidden for r in quick])
                for r, d in zip(quick, drafts):
                    r.seq.draft_token_ids = d
                taken = {id(r) for r in quick}
                requests = [r for r in requests if id(r) not in taken]
        self._propose_eager(requests)

    def _propose_eager(self, requests: list[DraftRequest]) -> None:
        if not requests:
            return
        seqs = [r.seq for r in requests]
        starts = [r.start for r in requests]
        lens = [r.hidden.shape[0] for r in requests]
        # 1. the MTP over every newly computed position: input (token t+1, hidden t)
        tokens = [t for r, m in zip(requests, lens) for t in r.seq.token_ids[r.start + 1:r.start + 1 + m]]
        ctx = self.runner.make_context(seqs, starts, lens)
        input_ids = torch.tensor(tokens, dtype=torch.long, device=self.runner.device)
        drafting = [i for i, r in enumerate(requests) if r.needs_draft] if self.k else []
        # only the last position of a drafting sequence yields a draft: the rest only fill the MTP's cache
        last_rows = [ctx.query_start_loc[i + 1] - 1 for i in drafting]
        h = self.model.mtp_forward(input_ids, torch.cat([r.hidden for r in requests]), ctx, last_rows)
        for r in requests:
            r.seq.draft_token_ids = []
        if not drafting:
            return
        draft = torch.argmax(self.model.compute_logits(h), dim=-1)
        seqs = [requests[i].seq for i in drafting]
        for s, d in zip(seqs, draft.tolist()):
            s.draft_token_ids.append(d)
        # 2. k - 1 more drafts, one position at a time, feeding back the MTP hidden state and the draft
        positions = [starts[i] + lens[i] for i in drafting]
        for j in range(1, self.k):
            ctx = self.runner.make_context(seqs, positions, [1] * len(seqs))
            h = self.model.mtp_forward(draft, h, ctx)
            draft = torch.argmax(self.model.compute_logits(h), dim=-1)
            for s, d in zip(seqs, draft.tolist()):
                s.draft_token_ids.append(d)
            positions = [p + 1 for p in positions]


@dataclass
class SpecStats:
    num_drafted: int = 0          # draft tokens verified
    num_accepted: int = 0         # draft tokens accepted
    num_verifications: int = 0    # verification steps (one per sequence per step)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.num_drafted += num_drafts
        self.num_accepted += num_accepted
        self.num_verifications += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification step: accepted drafts + the one bonus/corrected token."""
        if not self.num_verifications:
            return 0.0
        return 1.0 + self.num_accepted / self.num_verifications

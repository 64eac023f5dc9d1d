"""Captured steps from the graph-safe PyTorch forward: CUDA graphs on a GPU, torch.compile on any device.

`model.forward_step` (nemoh.models.forward_context.StepContext) has static shapes for a given number of
sequences and new tokens per sequence (num_seqs, q) and never synchronises with the host. Each batch bucket
(num_seqs rounded up to one of BUCKETS) gets persistent input buffers and one captured callable:

- "cuda": a CUDA graph captured per bucket after a warm-up (which also runs the Triton kernels' autotuning),
  replayed with the inputs copied into its buffers (as vLLM and nano-vllm do);
- "inductor": `torch.compile(fullgraph=True)` of the same step per bucket (inductor; the CPU's compiled step
  when the native plans are not wanted, `EngineArgs.cpu_step_backend="inductor"`);
- "eager": the graph-safe step run as it is (what the two above capture; the tests use it to check the
  bucketing on a CPU).

A bucket's rows past the step's sequences are padding: they read and write one reserved state slot and one
reserved KV block (`ModelRunner.pad_slot` / `pad_block`), which no sequence owns.
"""
from __future__ import annotations

import logging
import os
import sys

import torch

from nemoh.engine.kv_cache import blocks_for
from nemoh.engine.scheduler import ScheduledSeq
from nemoh.engine.sequence import Sequence
from nemoh.models.forward_context import StepContext

logger = logging.getLogger(__name__)
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def use_persistent_inductor_cache() -> None:
    """Inductor's compiled code goes to ~/.cache/nemoh/inductor (unless TORCHINDUCTOR_CACHE_DIR says otherwise),
    so that a restarted server reuses it instead of compiling every bucket again (its default is under /tmp)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        default = default_cache_dir()
    except ImportError:           # older torch: leave inductor's own choice
        return
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default):    # torch fills in its default on first use
        path = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "nemoh", "inductor")
        os.makedirs(path, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path


def _progress(total: int, desc: str):
    """A progress bar on a terminal (capturing or compiling every bucket takes seconds to minutes), else None."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)


class _Bucket:
    """Static buffers and the captured step for `num_seqs` sequences of q rows (main model or MTP block)."""

    def __init__(self, model, runner, num_seqs: int, q: int, max_blocks: int, mtp: bool,
                 saved: dict[int, tuple[torch.Tensor, torch.Tensor]] | None, mode: str, pool):
        dev, bs = runner.device, runner.block_size
        rows = num_seqs * q
        self.num_seqs, self.q, self.mtp = num_seqs, q, mtp
        self.pad_slot, self.pad_block, self.block_size = runner.pad_slot, runner.pad_block, bs
        self.ids = torch.zeros(rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((rows,), self.pad_block * bs, dtype=torch.long, device=dev)
        self.state_slots = torch.full((num_seqs,), self.pad_slot, dtype=torch.long, device=dev)
        self.block_tables = torch.full((num_seqs, max_blocks), self.pad_block, dtype=torch.long, device=dev)
        self.hidden_in = torch.zeros(rows, model.config.hidden_size, dtype=model.dtype, device=dev) if mtp else None
        self.saved = saved
        ctx = StepContext(num_seqs, q, self.positions, self.slot_mapping, self.state_slots, self.block_tables, bs,
                          runner.kv_caches, runner.mamba_caches, runner.kv_scales, self.saved)

        def step():
            if mtp:
                hidden = model.mtp_forward_step(self.ids, self.hidden_in, ctx)
            else:
                hidden = model.forward_step(self.ids, ctx)
            logits = model.compute_logits(hidden)
            return hidden, logits, logits.argmax(-1)

        self.outputs = None
        if mode == "cuda":
            stream = torch.cuda.Stream(device=dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.inference_mode(), torch.cuda.stream(stream):
                step()                       # warm-up: allocations, Triton autotuning, lazy inits
                step()
            torch.cuda.current_stream(dev).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(self.graph, pool=pool):
                self.outputs = step()
            self._replay = self.graph.replay
        elif mode == "inductor":
            compiled = torch.compile(step, fullgraph=True, dynamic=False)
            self._replay = lambda: setattr(self, "outputs", compiled())
            with torch.inference_mode():
                self._replay()               # compile now, not in the first request's step
        else:
            self._replay = lambda: setattr(self, "outputs", step())

    def fill(self, seqs: list[Sequence], starts: list[int], tokens: list[int]) -> None:
        """Sequence i feeds q tokens at positions starts[i] .. starts[i] + q - 1; the other rows are padding."""
        q, bs, n = self.q, self.block_size, len(seqs)
        positions, slot_mapping = [], []
        for seq, start in zip(seqs, starts):
            for p in range(start, start + q):
                positions.append(p)
                slot_mapping.append(seq.block_table[p // bs] * bs + p % bs)
        pad = (self.num_seqs - n) * q
        self.ids.copy_(torch.tensor(tokens + [0] * pad))
        self.positions.copy_(torch.tensor(positions + [0] * pad))
        self.slot_mapping.copy_(torch.tensor(slot_mapping + [self.pad_block * bs] * pad))
        self.state_slots.copy_(torch.tensor([s.state_slot for s in seqs] + [self.pad_slot] * (self.num_seqs - n)))
        width = self.block_tables.shape[1]
        tables = [s.block_table + [self.pad_block] * (width - len(s.block_table)) for s in seqs]
        tables += [[self.pad_block] * width] * (self.num_seqs - n)
        self.block_tables.copy_(torch.tensor(tables))

    def run(self):
        self._replay()
        return self.outputs


class GraphSteps:
    """The captured uniform steps of one engine from the graph-safe forward (see the module docstring). The same
    interface as `nemoh.engine.captured_step.CapturedSteps`: `takes`, `run_main`, `takes_drafts`, `draft`."""

    def __init__(self, model, runner, max_seqs: int, num_speculative_tokens: int, max_model_len: int, mode: str):
        self.model, self.runner, self.mode, self.k = model, runner, mode, num_speculative_tokens
        self.max_seqs = max_seqs
        self.max_blocks = blocks_for(max_model_len + 2 * self.k + 1, runner.block_size)
        self.buckets = [b for b in BUCKETS if b < max_seqs] + [max_seqs]
        self.pool = torch.cuda.graph_pool_handle() if mode == "cuda" else None
        self._made: dict[tuple[str, int], _Bucket] = {}
        self._saved: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        kinds = [("decode", 1)] + ([("verify", 1 + self.k), ("mtp_first", 1 + self.k), ("mtp_next", 1)]
                                   if self.k else [])
        if mode == "inductor":
            use_persistent_inductor_cache()
        todo = [(kind, b) for kind, _ in kinds for b in reversed(self.buckets)]  # largest first: the pool is sized once
        bar = _progress(len(todo), "Capturing CUDA graphs" if mode == "cuda" else "Compiling steps")
        for kind, b in todo:
            self.bucket(kind, b)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        logger.info("nemoh captured steps: %s for %d batch buckets up to %d sequences (%s)",
                    {"cuda": "CUDA graphs", "inductor": "torch.compile (inductor)", "eager": "graph-safe eager"}[mode],
                    len(self.buckets), max_seqs, ", ".join(k for k, _ in kinds))

    def bucket(self, kind: str, num_seqs: int) -> _Bucket:
        size = next(b for b in self.buckets if b >= num_seqs)
        key = (kind, size)
        if key not in self._made:
            q = 1 if kind in ("decode", "mtp_next") else 1 + self.k
            self._made[key] = _Bucket(self.model, self.runner, size, q, self.max_blocks, kind.startswith("mtp"),
                                      self._saved_states() if kind == "verify" else None, self.mode, self.pool)
        return self._made[key]

    def _saved_states(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The per-position Mamba states of a verification, (max_seqs, 1 + k, ...) per layer: one set shared by
        every verify bucket (a bucket of b sequences fills the first b rows; steps never overlap), so they cost
        what one largest verification keeps, as the memory plan counts, not once per bucket."""
        if self._saved is None and self.runner.verify_states is not None:
            self._saved = self.runner.verify_states      # the engine's one set, shared with eager verifications
        if self._saved is None:
            dev, q = self.runner.device, 1 + self.k
            self._saved = {i: (torch.zeros(self.max_seqs, q, *c.shape[1:], dtype=c.dtype, device=dev),
                               torch.zeros(self.max_seqs, q, *s.shape[1:], dtype=s.dtype, device=dev))
                           for i, (c, s) in self.runner.mamba_caches.items()}
        return self._saved

    # ---- the main model -----------------------------------------------------------------------------------
    def takes(self, s: ScheduledSeq) -> int:
        seq = s.seq
        if seq.num_computed_tokens == 0 or seq.state_slot is None or not s.samples:
            return 0
        if len(seq.block_table) > self.max_blocks:
            return 0
        q = s.num_new_tokens
        if q == 1 and not s.num_draft_tokens:
            return 1
        if self.k and q == 1 + self.k and s.num_draft_tokens == self.k:
            return q
        return 0

    def run_main(self, group: list[ScheduledSeq], q: int):
        from nemoh.engine.captured_step import CapturedOutput

        out = []
        for start in range(0, len(group), self.max_seqs):
            part = group[start:start + self.max_seqs]
            seqs = [s.seq for s in part]
            bucket = self.bucket("decode" if q == 1 else "verify", len(seqs))
            tokens = []
            for seq in seqs:
                tokens.append(seq.token_ids[-1])
                tokens.extend(seq.draft_token_ids[:q - 1])
            bucket.fill(seqs, [seq.num_computed_tokens for seq in seqs], tokens)
            hidden, logits, argmax = bucket.run()
            argmax = argmax[:len(seqs) * q].tolist()
            for i in range(len(seqs)):
                rows = slice(i * q, (i + 1) * q)
                saved = {layer: (c[i], s[i]) for layer, (c, s) in (bucket.saved or {}).items()}
                out.append(CapturedOutput(hidden, logits, rows, argmax[rows], saved))
        return out

    # ---- MTP drafting --------------------------------------------------------------------------------------
    def takes_drafts(self, num_positions: list[int], starts: list[int]) -> bool:
        return bool(self.k) and len(num_positions) <= self.max_seqs and all(
            1 <= m <= 1 + self.k for m in num_positions) and all(s > 0 for s in starts)

    def draft(self, seqs: list[Sequence], starts: list[int], hiddens: list[torch.Tensor]) -> list[list[int]]:
        """k MTP drafts per sequence, as `CapturedSteps.draft` makes them (padded rows past each sequence's m
        newly computed positions, the row of its last one drafting)."""
        n = len(seqs)
        first = self.bucket("mtp_first", n)
        q = first.q
        tokens = []
        for seq, start, h in zip(seqs, starts, hiddens):
            m = h.shape[0]
            tokens.extend(seq.token_ids[start + 1:start + 1 + m])
            tokens.extend([0] * (q - m))
            first.hidden_in[len(tokens) - q:len(tokens) - q + m] = h
        first.fill(seqs, starts, tokens)
        hidden, _, argmax = first.run()
        select = [i * q + h.shape[0] - 1 for i, h in enumerate(hiddens)]
        picked = argmax[:n * q].tolist()
        drafts = [[picked[r]] for r in select]
        hidden = hidden[torch.tensor(select, device=hidden.device)]
        positions = [start + h.shape[0] for start, h in zip(starts, hiddens)]
        nxt = self.bucket("mtp_next", n)
        for _ in range(1, self.k):
            nxt.hidden_in[:n] = hidden
            nxt.fill(seqs, positions, [d[-1] for d in drafts])
            out_hidden, _, argmax = nxt.run()
            for d, t in zip(drafts, argmax[:n].tolist()):
                d.append(t)
            positions = [p + 1 for p in positions]
            hidden = out_hidden[:n]
        return drafts

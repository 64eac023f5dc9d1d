"""Captured steps: the steady-state forward of serving replayed without per-operator overhead.

A step is *uniform* when every sequence in it continues from its caches with the same number q of new
tokens: a decode step (q = 1) or a speculative verification (q = 1 + k). After prefill, every step of a
served request is uniform, so this is where decode time goes. Prefill chunks and anything irregular take the
eager PyTorch forward (nemoh/models/, the reference), which stays the fallback (`enforce_eager=True`).

On a CPU a captured step is a native plan (`nemoh.kernels.cpu_plan.StackPlan`): the model's layers as one list
of native kernel calls over persistent input buffers, replayed by one call per step (the CPU's analogue of a
CUDA graph). Speculative decoding uses four: the main model's decode (q = 1) and verification (q = 1 + k)
steps, the MTP block over a verification's positions (q = 1 + k rows, one drafted), and one MTP draft step.

Filling the inputs is the only per-step Python: token ids, positions, KV slots and state slots per row and
sequence, and the part of each block table that changed since the last step.
"""
from __future__ import annotations

import ctypes
import logging
import torch

from nemoh.engine.kv_cache import blocks_for
from nemoh.engine.scheduler import ScheduledSeq
from nemoh.engine.sequence import Sequence
from nemoh.kernels import cpu_library
from nemoh.kernels.cpu_plan import PlanCaches, StackPlan, plan_supports
from nemoh.kernels.linear_cpu import Panels

logger = logging.getLogger(__name__)


def _int_view(t: torch.Tensor, ctype) -> ctypes.Array:
    """A ctypes array over a contiguous integer tensor: assigning a Python list to a slice of it is ~20x faster
    than building a tensor from the list."""
    return (ctype * t.numel()).from_address(t.data_ptr())


class _PlanInputs:
    """Writes a step's rows and sequences into a plan's input buffers."""

    def __init__(self, plan: StackPlan, block_size: int):
        self.plan = plan
        self.block_size = block_size
        self.ids = _int_view(plan.ids, ctypes.c_int64)
        self.positions = _int_view(plan.positions, ctypes.c_int64)
        self.slot_mapping = _int_view(plan.slot_mapping, ctypes.c_int64)
        self.slots = _int_view(plan.slots, ctypes.c_int64)
        self.select = _int_view(plan.select, ctypes.c_int64) if plan.select is not None else None
        self.argmax = _int_view(plan.argmax, ctypes.c_int64)      # read back as a list by slicing
        width = plan.max_blocks
        base = plan.block_tables.data_ptr()
        self.tables = [(ctypes.c_int32 * width).from_address(base + 4 * width * i) for i in range(plan.max_seqs)]
        self.table_of_row: list[tuple[int, int]] = [(-1, 0)] * plan.max_seqs   # (seq_id, blocks written)

    def fill(self, seqs: list[Sequence], starts: list[int], tokens: list[int]) -> None:
        """Sequence i feeds q tokens at positions starts[i] .. starts[i] + q - 1 (tokens: q per sequence)."""
        q, bs = self.plan.q, self.block_size
        n = len(seqs)
        positions, slot_mapping = [], []
        for i, (seq, start) in enumerate(zip(seqs, starts)):
            table = seq.block_table
            for p in range(start, start + q):
                positions.append(p)
                slot_mapping.append(table[p // bs] * bs + p % bs)
            self.slots[i] = seq.state_slot if seq.state_slot is not None else 0
            seq_id, written = self.table_of_row[i]
            if seq_id != seq.seq_id:
                written = 0
            if written < len(table):
                self.tables[i][written:len(table)] = table[written:]
                self.table_of_row[i] = (seq.seq_id, len(table))
        rows = n * q
        self.ids[:rows] = tokens
        self.positions[:rows] = positions
        self.slot_mapping[:rows] = slot_mapping


class CapturedOutput:
    """One sequence's share of a captured main-model step: rows [row, row + q) of the step's buffers (valid
    until the next replay of the same plan). The views are made when read."""

    __slots__ = ("_hidden", "_logits", "_rows", "argmax", "intermediate")

    def __init__(self, hidden: torch.Tensor, logits: torch.Tensor, rows: slice, argmax: list[int],
                 intermediate: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self._hidden, self._logits, self._rows = hidden, logits, rows
        self.argmax = argmax                  # (q,) argmax of each row's logits
        self.intermediate = intermediate      # Mamba states after each row, for roll-back

    @property
    def hidden(self) -> torch.Tensor:
        """(q, hidden) after norm_f."""
        return self._hidden[self._rows]

    @property
    def logits(self) -> torch.Tensor:
        """(q, vocab)."""
        return self._logits[self._rows]


class CapturedSteps:
    """The captured uniform steps of one engine (CPU native plans)."""

    def __init__(self, model: torch.nn.Module, runner, max_seqs: int, num_speculative_tokens: int,
                 max_model_len: int):
        k = num_speculative_tokens
        caches = PlanCaches(runner.kv_caches, runner.mamba_caches, runner.kv_scales, runner.verify_states)
        max_blocks = blocks_for(max_model_len + 2 * k + 1, runner.block_size)
        self.block_size = runner.block_size
        self.k = k
        self.max_seqs = max_seqs
        backbone = model.backbone
        self.panels = Panels(cpu_library.library())       # the weights in the kernels' layout, shared by the plans
        plan = lambda layers, final, q, **kw: StackPlan(model, layers, final, caches, max_seqs, q, max_blocks,  # noqa
                                                        panels=self.panels, **kw)
        self.plans: dict[str, StackPlan] = {"decode": plan(backbone.layers, backbone.norm_f, 1)}
        if k:
            self.plans["verify"] = plan(backbone.layers, backbone.norm_f, 1 + k, save_states=True)
            mtp = model.mtp
            final = mtp.layers[-1].final_layernorm
            self.plans["mtp_first"] = plan(mtp.layers, final, 1 + k, mtp=mtp, select_rows=True)
            self.plans["mtp_next"] = plan(mtp.layers, final, 1, mtp=mtp)
        self.inputs = {name: _PlanInputs(plan, self.block_size) for name, plan in self.plans.items()}
        calls = ", ".join(f"{name} {p.count}" for name, p in self.plans.items())
        logger.info("nemoh captured steps: native CPU plans for up to %d sequences (kernel calls per replay: %s); "
                    "weights re-laid for the kernels: %.3f GiB", max_seqs, calls, self.panels.nbytes / 2 ** 30)

    @classmethod
    def create(cls, model: torch.nn.Module, runner, args, max_model_len: int):
        """The captured steps for this engine (native plans, or `graph_step.GraphSteps`), or None (with one
        logged line) when every step runs eagerly."""
        if args.enforce_eager:
            logger.info("nemoh captured steps: off (enforce_eager); every step runs the eager PyTorch forward")
            return None
        if getattr(model, "tp", None) is not None:
            logger.info("nemoh captured steps: off under tensor parallelism (the captured steps are single-rank); "
                        "every step runs the eager PyTorch forward")
            return None
        k = args.speculative_config.num_speculative_tokens if args.speculative_config else 0
        max_seqs = min(args.max_num_seqs, runner.num_state_slots)
        mode = args.captured_step
        if mode == "auto":
            mode = "cuda_graph" if model.device.type == "cuda" else "native"
        if mode == "native":
            if model.device.type != "cpu":
                logger.warning("nemoh captured steps: the native plans run on a CPU, the model is on %s; eager",
                               model.device)
                return None
            if cpu_library.library() is None:
                return None      # library() has said why
            reason = plan_supports(model)
            if reason is not None:
                logger.warning("nemoh captured steps: off, the native plan cannot run this model (%s); eager",
                               reason)
                return None
            builder = lambda: cls(model, runner, max_seqs, k, max_model_len)         # noqa: E731
        else:
            from nemoh.engine.graph_step import GraphSteps

            graph_mode = {"cuda_graph": "cuda", "inductor": "inductor", "graph_eager": "eager"}[mode]
            if graph_mode == "cuda" and model.device.type != "cuda":
                logger.warning("nemoh captured steps: CUDA graphs need a CUDA device; eager forward")
                return None
            builder = lambda: GraphSteps(model, runner, max_seqs, k, max_model_len, graph_mode)  # noqa: E731
        try:
            return builder()
        except Exception as e:  # noqa: BLE001 - a step that cannot be captured runs eagerly, never crashes
            logger.warning("nemoh captured steps: off, capturing the %s step failed (%s: %s); eager forward",
                           mode, type(e).__name__, e)
            return None

    # ---- the main model -------------------------------------------------------------------------------------
    def takes(self, s: ScheduledSeq) -> int:
        """q when this scheduled sequence can join a captured main-model step (0 when not)."""
        seq = s.seq
        if seq.num_computed_tokens == 0 or seq.state_slot is None or not s.samples:
            return 0
        q = s.num_new_tokens
        if q == 1 and not s.num_draft_tokens:
            return 1
        if self.k and q == 1 + self.k and s.num_draft_tokens == self.k:
            return q
        return 0

    def run_main(self, group: list[ScheduledSeq], q: int) -> list[CapturedOutput]:
        """One captured step of the main model over `group` (each sequence feeding q tokens)."""
        name = "decode" if q == 1 else "verify"
        plan, inputs = self.plans[name], self.inputs[name]
        out: list[CapturedOutput] = []
        for start in range(0, len(group), self.max_seqs):
            part = group[start:start + self.max_seqs]
            seqs = [s.seq for s in part]
            tokens = []
            for seq in seqs:
                tokens.append(seq.token_ids[-1])
                tokens.extend(seq.draft_token_ids[:q - 1])
            inputs.fill(seqs, [seq.num_computed_tokens for seq in seqs], tokens)
            plan.run(len(seqs))
            argmax = inputs.argmax[:len(seqs) * q]
            for i in range(len(seqs)):
                rows = slice(i * q, (i + 1) * q)
                saved = {layer: (conv[i], ssm[i]) for layer, (conv, ssm) in plan.saved.items()}
                out.append(CapturedOutput(plan.out, plan.logits, rows, argmax[rows], saved))
        return out

    # ---- MTP drafting ----------------------------------------------------------------------------------------
    def takes_drafts(self, num_positions: list[int], starts: list[int]) -> bool:
        """Whether the MTP drafts of these requests (num_positions newly computed each) can be captured."""
        return bool(self.k) and len(num_positions) <= self.max_seqs and all(
            1 <= m <= 1 + self.k for m in num_positions) and all(s > 0 for s in starts)

    def draft(self, seqs: list[Sequence], starts: list[int], hiddens: list[torch.Tensor]) -> list[list[int]]:
        """k MTP drafts per sequence. Sequence i's main model newly computed hiddens[i] (m rows) at positions
        starts[i] .. starts[i] + m - 1; the MTP runs over 1 + k rows per sequence from starts[i] (the rows past
        m are padding, whose cache entries later steps overwrite before anything reads them), and the row of
        position starts[i] + m - 1 gives the first draft."""
        first, first_in = self.plans["mtp_first"], self.inputs["mtp_first"]
        nxt, nxt_in = self.plans["mtp_next"], self.inputs["mtp_next"]
        q = first.q
        n = len(seqs)
        tokens = []
        for seq, start, h in zip(seqs, starts, hiddens):
            m = h.shape[0]
            tokens.extend(seq.token_ids[start + 1:start + 1 + m])
            tokens.extend([0] * (q - m))
        for i, h in enumerate(hiddens):
            first.hidden_in[i * q:i * q + h.shape[0]] = h
            first_in.select[i] = i * q + h.shape[0] - 1
        first_in.fill(seqs, starts, tokens)
        first.run(n)
        drafts = [[d] for d in first_in.argmax[:n]]
        positions = [start + h.shape[0] for start, h in zip(starts, hiddens)]
        hidden = first.selected
        for _ in range(1, self.k):
            nxt.hidden_in[:n] = hidden[:n]
            nxt_in.fill(seqs, positions, [d[-1] for d in drafts])
            nxt.run(n)
            for d, t in zip(drafts, nxt_in.argmax[:n]):
                d.append(t)
            positions = [p + 1 for p in positions]
            hidden = nxt.out
        return drafts

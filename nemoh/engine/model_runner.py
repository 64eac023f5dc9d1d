"""The model runner: owns the cache tensors, turns a scheduled batch into a flat ForwardContext, runs the model.

Sizing (nemoh.engine.memory_plan): KV blocks (every attention layer incl. the MTP block's) and Mamba state slots
share one budget, `cache_memory_gb` or what the device holds after the weights, their CPU copies and the peak
transients of a step at the largest admitted shapes (a prefill chunk of max_num_batched_tokens; a verification
of max_num_seqs sequences with its per-position Mamba states). With prefix caching, the snapshot slots for the
resume points' Mamba states are set aside first (MemoryPlan.prefix_snapshots). Each running sequence needs one
slot, so slots are sized next (up to `max_num_seqs`) and the rest goes to KV blocks, capped at what the slots'
and snapshots' sequences of `max_model_len` tokens could ever use. A budget that cannot hold one sequence of
max_model_len is an error that says what length fits.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from nemoh.engine.captured_step import CapturedSteps
from nemoh.engine.config import EngineArgs
from nemoh.engine.kv_cache import allocate_kv_caches, kv_bytes_per_block, kv_cache_dtype
from nemoh.engine.memory_plan import device_memory, engine_plan
from nemoh.engine.memory_profile import captured_step_bytes, profile_steps
from nemoh.engine.scheduler import ScheduledSeq
from nemoh.engine.sequence import Sequence
from nemoh.engine.state_cache import allocate_mamba_caches, state_bytes_per_slot
from nemoh.models.forward_context import ForwardContext
from nemoh.kernels import cpu_library
from nemoh.models.linear import PACK_MIN_ELEMENTS, packed_bytes_estimate, set_packing

logger = logging.getLogger(__name__)
GiB = 1024 ** 3


@dataclass
class SeqResult:
    """What one scheduled sequence got out of the main model this step."""
    scheduled: ScheduledSeq
    start: int                          # num_computed_tokens before this step (position of the first new token)
    hidden: torch.Tensor | None         # (num_new_tokens, hidden) after norm_f, for the MTP block (else None)
    logits: torch.Tensor | None         # (1 + num_drafts, vocab) when the step samples, else None
    intermediate: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    argmax: list[int] | None = None     # argmax of each logits row, from one call over the whole batch


class CapturedResult(SeqResult):
    """A SeqResult from a captured step: its hidden state and logits are views of the step's buffers, made
    only when read (a greedy decode reads neither: its token is `argmax`)."""

    def __init__(self, scheduled: ScheduledSeq, start: int, output, keeps_hidden: bool):
        self.scheduled, self.start, self.intermediate, self.argmax = (
            scheduled, start, output.intermediate, output.argmax)
        self._output, self._keeps_hidden = output, keeps_hidden

    @property
    def hidden(self) -> torch.Tensor | None:
        return self._output.hidden if self._keeps_hidden else None

    @property
    def logits(self) -> torch.Tensor:
        return self._output.logits


def combine_shared_weights(model: torch.nn.Module) -> None:
    """Stack each MoE layer's dense expert weights and join each attention layer's q / k / v weights now, as the
    eager forward and the captured steps otherwise do on first use (the parameters become views of the combined
    tensors: no extra copy). Done later, after the CPU panel copies of the separate weights were made, it made
    them anew and left the old ones and the separate weights as freed, fragmented allocator memory (7.6 MiB on
    the demo model, its three MoE layers' experts); on a GPU, stacking happens before the caches take the memory."""
    from nemoh.models.attention import Attention
    from nemoh.models.linear import Linear
    from nemoh.models.moe import LatentMoE

    for m in model.modules():
        if isinstance(m, LatentMoE) and m._projections()[2]:
            m._stacked_weights()
        elif isinstance(m, Attention) and all(type(p) is Linear for p in (m.q_proj, m.k_proj, m.v_proj)):
            m._qkv_weight.get([p.weight for p in (m.q_proj, m.k_proj, m.v_proj)])


class ModelRunner:
    def __init__(self, model: torch.nn.Module, args: EngineArgs, max_model_len: int):
        self.model = model
        self.config = cfg = model.config
        self.args = args
        self.device = model.device
        self.block_size = args.block_size
        k = args.speculative_config.num_speculative_tokens if args.speculative_config else 0
        self.kv_layer_ids = list(cfg.attention_layer_ids) + (list(cfg.mtp_attention_layer_ids) if k else [])
        # the MTP drafter reads the main model's hidden at every new position; without it only sampled rows
        self.keeps_all_hidden = bool(k)
        self.mamba_layer_ids = list(cfg.mamba_layer_ids)
        self.kv_dtype = kv_cache_dtype(args.kv_cache_dtype, model.dtype)
        self.conv_dtype = model.dtype
        self.ssm_dtype = getattr(torch, args.mamba_ssm_cache_dtype or cfg.mamba_ssm_cache_dtype)
        set_packing(model, args.cpu_packed_weights)
        combine_shared_weights(model)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()        # the stacking's transient, before free memory is read
        # the packed copies are made on first use, after the caches take their share of the free memory
        self.packed_bytes = packed_bytes_estimate(model) if self.device.type == "cpu" else 0
        self.num_kv_blocks, self.num_state_slots, self.num_snapshot_slots = self._size_caches(max_model_len, k)
        # one more KV block and state slot than the managers hand out: the padding rows of a captured step's
        # batch bucket read and write them (nemoh.engine.graph_step); the snapshot slots follow the padding slot
        self.pad_block, self.pad_slot = self.num_kv_blocks, self.num_state_slots
        self.first_snapshot_slot = self.num_state_slots + 1
        self.kv_caches = allocate_kv_caches(self.kv_layer_ids, self.num_kv_blocks + 1, self.block_size,
                                            cfg.num_key_value_heads, cfg.head_dim, self.kv_dtype, self.device)
        self.mamba_caches = allocate_mamba_caches(
            self.mamba_layer_ids, self.num_state_slots + 1 + self.num_snapshot_slots, cfg.mamba_conv_dim, cfg.conv_kernel, cfg.mamba_num_heads,
            cfg.mamba_head_dim, cfg.ssm_state_size, self.conv_dtype, self.ssm_dtype, self.device)
        # a verification's per-position Mamba states, kept for the roll-back to the last accepted token: one set of
        # buffers for up to max_num_seqs sequences x (1 + k) positions, written by the captured and the eager
        # verifications alike (the memory plan's "MTP verify states")
        self.verify_states = None
        if k:
            rows = min(args.max_num_seqs, self.num_state_slots)
            self.verify_states = {i: (c.new_zeros(rows, 1 + k, *c.shape[1:]), s.new_zeros(rows, 1 + k, *s.shape[1:]))
                                  for i, (c, s) in self.mamba_caches.items()}
            name = next(n for n in self.plan.resident if n.startswith("MTP verify states"))
            del self.plan.resident[name]
            self.plan.resident[f"MTP verify states ({rows} seqs x {1 + k} positions)"] = sum(
                t.numel() * t.element_size() for pair in self.verify_states.values() for t in pair)
        self.kv_scales: dict[int, tuple[float, float]] = {}
        if args.kv_cache_dtype == "fp8":
            scales = getattr(model, "kv_scales", None) or {}
            self.kv_scales = {i: tuple(scales.get(i, (1.0, 1.0))) for i in self.kv_layer_ids}
        if self.packed_bytes:
            logger.info("nemoh CPU products: packed copies of the dense weights of %d elements and more, %.3f GiB "
                        "more memory (cpu_packed_weights=False turns them off)", PACK_MIN_ELEMENTS,
                        self.packed_bytes / GiB)
        for line in self.plan.summary_lines():
            logger.info("nemoh memory plan: %s", line)
        logger.info(
            "nemoh cache: %d KV blocks x %d tokens = %d tokens of KV (%s, %d layers), %d Mamba state slots "
            "(ssm %s) + %d for the prefix cache, %.3f GiB", self.num_kv_blocks, self.block_size,
            self.num_kv_blocks * self.block_size, self.kv_dtype, len(self.kv_layer_ids), self.num_state_slots,
            self.ssm_dtype, self.num_snapshot_slots, self.cache_bytes / GiB)
        # decode and verification steps replayed without per-operator overhead (None: every step is eager)
        before = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        self.captured = CapturedSteps.create(model, self, args, max_model_len)
        if self.captured is not None:
            # their buffers stay allocated: resident, made after the caches were sized (on CUDA out of what
            # gpu_memory_utilization leaves over; a CUDA graph's pool is only seen by the allocator)
            held = (torch.cuda.memory_allocated(self.device) - before if self.device.type == "cuda"
                    else captured_step_bytes(self.captured, self))
            self.plan.resident["captured step buffers"] = held
            logger.info("nemoh memory plan: captured step buffers %.3f GiB", held / GiB)

    # ---- sizing ---------------------------------------------------------------------------------------
    def _size_caches(self, max_model_len: int, k: int) -> tuple[int, int, int]:
        cfg, args = self.config, self.args
        self.bytes_per_block = kv_bytes_per_block(len(self.kv_layer_ids), self.block_size, cfg.num_key_value_heads,
                                                  cfg.head_dim, self.kv_dtype)
        self.bytes_per_slot = state_bytes_per_slot(
            len(self.mamba_layer_ids), cfg.mamba_conv_dim, cfg.conv_kernel, cfg.mamba_num_heads, cfg.mamba_head_dim,
            cfg.ssm_state_size, self.conv_dtype, self.ssm_dtype)
        quant_config = getattr(self.model, "quant_config", None)
        plan = lambda **kw: engine_plan(cfg, args, max_model_len, self.device, dtype=self.model.dtype,  # noqa
                                        quant_config=quant_config, model=self.model,
                                        native_cpu_kernels=cpu_library.library() is not None, **kw)
        self.plan = plan()
        self.profile = None
        profile = args.profile_memory
        if profile is None:
            # (not under tensor parallelism: the workers would have to run the same profiling step)
            profile = (args.cache_memory_gb is None and args.num_kv_blocks is None
                       and args.tensor_parallel_size == 1)
        if profile and args.tensor_parallel_size == 1:
            # what the device holds before the profiling step: its freed activations must not count twice
            memory = device_memory(self.device)
            self.profile = profile_steps(self, k)
            self.plan = plan(measured=self.profile, memory=memory)
        snapshots = self.plan.prefix_snapshots
        if args.num_kv_blocks is not None:
            return args.num_kv_blocks, self.plan.cache_sizes(args.num_state_slots)[1], snapshots
        self.plan.check_fits()
        return (*self.plan.cache_sizes(args.num_state_slots), snapshots)

    @property
    def cache_bytes(self) -> int:
        return (self.num_kv_blocks * self.bytes_per_block
                + (self.num_state_slots + self.num_snapshot_slots) * self.bytes_per_slot)

    # ---- copies for the prefix cache ----------------------------------------------------------------------
    def copy_state(self, src: int, dst: int) -> None:
        """Copy the Mamba states (conv and SSM, every layer) of slot `src` into slot `dst`."""
        for conv, ssm in self.mamba_caches.values():
            conv[dst].copy_(conv[src])
            ssm[dst].copy_(ssm[src])

    def copy_block(self, src: int, dst: int) -> None:
        """Copy KV block `src` into block `dst` in every attention layer (main model and MTP)."""
        for k_cache, v_cache in self.kv_caches.values():
            k_cache[dst].copy_(k_cache[src])
            v_cache[dst].copy_(v_cache[src])

    # ---- contexts ---------------------------------------------------------------------------------------
    def make_context(self, seqs: list[Sequence], starts: list[int], lens: list[int],
                     save_intermediate_states: bool = False, verify_row_offset: int = 0) -> ForwardContext:
        """A context for sequence i feeding `lens[i]` tokens at positions starts[i] ... starts[i] + lens[i] - 1."""
        bs = self.block_size
        slots: list[int] = []
        for seq, start, n in zip(seqs, starts, lens):
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
        qsl = [0]
        for n in lens:
            qsl.append(qsl[-1] + n)
        return ForwardContext(
            query_start_loc=qsl,
            context_lens=list(starts),
            state_slots=[s.state_slot if s.state_slot is not None else -1 for s in seqs],
            block_tables=[s.block_table for s in seqs],
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            block_size=bs,
            kv_caches=self.kv_caches,
            mamba_caches=self.mamba_caches,
            save_intermediate_states=save_intermediate_states,
            verify_states=self.verify_states if save_intermediate_states else None,
            verify_row_offset=verify_row_offset,
            kv_scales=self.kv_scales,
            reference_attention=self.args.enforce_eager,
        )

    @staticmethod
    def input_tokens(s: ScheduledSeq) -> list[int]:
        seq = s.seq
        if s.num_draft_tokens:
            return [seq.token_ids[-1]] + seq.draft_token_ids[: s.num_draft_tokens]
        start = seq.num_computed_tokens
        return seq.token_ids[start:start + s.num_new_tokens]

    # ---- the main model ---------------------------------------------------------------------------------
    def execute(self, scheduled: list[ScheduledSeq]) -> list[SeqResult]:
        """Run the main model over the batch. Uniform decode and verification steps take the captured step;
        the rest the eager forward, where verification (sequences with drafts) runs in its own forward with
        intermediate Mamba states saved, so prefill chunks never pay for per-position states."""
        results: dict[int, SeqResult] = {}
        rest = scheduled
        captured_verifications = 0         # their states fill the first rows of verify_states
        if self.captured is not None:
            by_q: dict[int, list[ScheduledSeq]] = {}
            rest = []
            for s in scheduled:
                q = self.captured.takes(s)
                if q:
                    by_q.setdefault(q, []).append(s)
                else:
                    rest.append(s)
            for q, group in by_q.items():
                captured_verifications += len(group) if q > 1 else 0
                for s, o in zip(group, self.captured.run_main(group, q)):
                    results[s.seq.seq_id] = CapturedResult(s, s.seq.num_computed_tokens, o, self.keeps_all_hidden)
            if not rest:
                return [results[s.seq.seq_id] for s in scheduled]
        with torch.inference_mode():
            verify = [s for s in rest if s.num_draft_tokens]
            plain = [s for s in rest if not s.num_draft_tokens]
            for group, save in ((plain, False), (verify, True)):
                if group:
                    for r in self._forward(group, save, captured_verifications):
                        results[r.scheduled.seq.seq_id] = r
        return [results[s.seq.seq_id] for s in scheduled]

    def _forward(self, group: list[ScheduledSeq], save: bool, verify_row_offset: int = 0) -> list[SeqResult]:
        seqs = [s.seq for s in group]
        starts = [s.num_computed_tokens for s in seqs]
        lens = [s.num_new_tokens for s in group]
        ctx = self.make_context(seqs, starts, lens, save, verify_row_offset)
        tokens = [t for s in group for t in self.input_tokens(s)]
        input_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        # logits only for the rows that are sampled: the last row, or all 1 + k rows of a verification
        rows, spans = [], []
        for i, s in enumerate(group):
            end = ctx.query_start_loc[i + 1]
            n = (1 + s.num_draft_tokens) if s.samples else 0
            spans.append((len(rows), n))
            rows.extend(range(end - n, end))
        if self.keeps_all_hidden:
            hidden = self.model.forward_hidden(input_ids, ctx)
            sampled = hidden[rows]
        else:   # nothing reads the other rows' hidden: the last layers run on the sampled rows alone
            every_row = len(rows) == len(tokens)            # a decode batch: nothing to leave out
            hidden, sampled = None, self.model.forward_hidden(input_ids, ctx, None if every_row else rows)
        logits = self.model.compute_logits(sampled) if rows else None
        # one argmax for the batch: greedy requests without logits processing need nothing else
        argmax = logits.argmax(-1).tolist() if logits is not None else []
        out = []
        for i, s in enumerate(group):
            a, b = ctx.query_start_loc[i], ctx.query_start_loc[i + 1]
            off, n = spans[i]
            inter = {layer: states[i] for layer, states in ctx.intermediate_states.items()} if save else {}
            out.append(SeqResult(s, starts[i], hidden[a:b] if hidden is not None else None,
                                 logits[off:off + n] if n else None, inter,
                                 argmax[off:off + n] if n else None))
        return out

    def rollback_mamba_state(self, seq: Sequence, intermediate: dict[int, tuple[torch.Tensor, torch.Tensor]],
                             position: int) -> None:
        """Put the state after new token `position` (0-based within the verified tokens) back into the slot."""
        for layer, (conv, ssm) in intermediate.items():
            conv_cache, ssm_cache = self.mamba_caches[layer]
            conv_cache[seq.state_slot] = conv[position]
            ssm_cache[seq.state_slot] = ssm[position]

"""The description of one forward step over a flat batch of tokens, passed explicitly to every layer.

The engine packs the new tokens of all scheduled sequences into one flat `input_ids` of shape (num_tokens,).
Sequence i owns tokens `query_start_loc[i]:query_start_loc[i+1]` and already had `context_lens[i]` tokens in
its caches before this step (0 for the first prefill chunk). A step may mix prefill chunks (many new tokens),
decode tokens (one new token) and speculative verification (1 + k new tokens) freely.

Caches are owned by the engine and registered here by layer index:
  kv_caches[layer_idx]    = (k_cache, v_cache), each (num_blocks, block_size, num_kv_heads, head_dim)
  mamba_caches[layer_idx] = (conv_state, ssm_state): conv_state (num_slots, conv_dim, conv_kernel - 1),
                            ssm_state (num_slots, num_heads, head_dim, state_size)
The MTP block's attention layers use indices num_hidden_layers + j.

A context without caches (`kv_caches` empty and `mamba_caches` empty) is a plain full causal forward: every
sequence starts from empty state and nothing is written back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch


def consecutive_span(values: list[int]) -> slice | None:
    """slice(first, last + 1) when `values` are consecutive ascending integers (indexing by it is a view;
    indexing by a tensor of them copies), else None."""
    if values and values == list(range(values[0], values[0] + len(values))):
        return slice(values[0], values[0] + len(values))
    return None


@dataclass
class ForwardContext:
    query_start_loc: list[int]                        # num_seqs + 1 offsets into the flat token axis
    context_lens: list[int]                           # per sequence: tokens already cached before this step
    state_slots: list[int] = field(default_factory=list)          # per sequence: Mamba state slot
    block_tables: list[list[int]] = field(default_factory=list)   # per sequence: KV block ids
    slot_mapping: torch.Tensor | None = None          # (num_tokens,) int64 flat KV slot of each new token
    block_size: int = 16
    kv_caches: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    mamba_caches: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # Speculative verification: Mamba layers record the state after every new position so that the engine
    # can roll back to the last accepted token. intermediate_states[layer_idx][i] = (conv, ssm) with
    # conv (q_len_i, conv_dim, conv_kernel - 1) and ssm (q_len_i, num_heads, head_dim, state_size).
    save_intermediate_states: bool = False
    intermediate_states: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    # Where those states are kept: the engine's buffers {layer_idx: (conv (rows, 1 + k, conv_dim, conv_kernel - 1),
    # ssm (rows, 1 + k, H, P, N))}, sequence i in row verify_row_offset + i (the rows before are a captured
    # verification's of the same step); None, or too few rows: tensors of their own
    verify_states: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    verify_row_offset: int = 0
    # Optional KV scales for an FP8 KV cache, by layer index: (k_scale, v_scale) floats.
    kv_scales: dict[int, tuple[float, float]] = field(default_factory=dict)
    # True: attention takes the plain reference path (each sequence's keys gathered whole, SDPA with a
    # (query x context) mask) instead of the tiled online softmax over the cache (nemoh.kernels.paged_attention)
    reference_attention: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.query_start_loc) - 1

    @property
    def query_lens(self) -> list[int]:
        q = self.query_start_loc
        return [q[i + 1] - q[i] for i in range(len(q) - 1)]

    @property
    def uses_cache(self) -> bool:
        return bool(self.kv_caches) or bool(self.mamba_caches)

    # ---- per-step plans, computed once and shared by every layer of the step ---------------------------------
    @cached_property
    def single_token_seqs(self) -> list[int]:
        """Sequences with exactly one new token: attention batches them, Mamba steps them together."""
        return [i for i, n in enumerate(self.query_lens) if n == 1]

    @cached_property
    def mamba_decode_seqs(self) -> list[int]:
        """Single-token sequences that continue from a cached state (not during speculative verification)."""
        if self.save_intermediate_states:
            return []
        return [i for i in self.single_token_seqs if self.context_lens[i] > 0]

    @cached_property
    def verify_groups(self) -> list[list[int]]:
        """Speculative verification: sequences continuing from a cached state, grouped by their number of
        new tokens, so that Mamba verifies each group in one batched pass."""
        if not self.save_intermediate_states:
            return []
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(self.query_lens):
            if self.context_lens[i] > 0:
                groups.setdefault(n, []).append(i)
        return list(groups.values())

    @cached_property
    def prefill_groups(self) -> list[list[int]]:
        """Sequences starting from empty caches with the same number (> 1) of new tokens, two or more of them
        (a batch of equal prompts): Mamba scans and attention attends each group in one batched pass instead
        of one sequence at a time. Empty during speculative verification, which keeps per-position states."""
        if self.save_intermediate_states:
            return []
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(self.query_lens):
            if n > 1 and self.context_lens[i] == 0:
                groups.setdefault(n, []).append(i)
        return [g for g in groups.values() if len(g) > 1]

    def group_index(self, seqs: list[int]) -> tuple[torch.Tensor | slice, torch.Tensor | slice]:
        """(token rows in sequence order, state slots) of a verify or prefill group, cached per group: slices
        where they are consecutive (a view costs nothing; an index tensor copies), index tensors otherwise."""
        key = tuple(seqs)
        cache = self.__dict__.setdefault("_group_index", {})
        if key not in cache:
            device = self.slot_mapping.device if self.slot_mapping is not None else None
            rows = [r for i in seqs for r in range(self.query_start_loc[i], self.query_start_loc[i + 1])]
            slots = [self.state_slots[i] for i in seqs]
            cache[key] = tuple(consecutive_span(v) or torch.tensor(v, device=device) for v in (rows, slots))
        return cache[key]

    @cached_property
    def mamba_decode_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(token rows, state slots) of `mamba_decode_seqs` as index tensors on the cache device."""
        device = self.slot_mapping.device if self.slot_mapping is not None else None
        seqs = self.mamba_decode_seqs
        return (torch.tensor([self.query_start_loc[i] for i in seqs], device=device),
                torch.tensor([self.state_slots[i] for i in seqs], device=device))

    @cached_property
    def mamba_decode_slot_window(self) -> tuple[slice, torch.Tensor | None] | None:
        """The decode sequences' states as one view of the cache: (the slots from the lowest to the highest of
        theirs, each sequence's place in that window, None when the window is exactly their slots in order).
        None when the window would be more than twice as many slots as sequences: then gathering their
        states costs less than stepping the slots in between (which the decode step leaves unchanged)."""
        slots = [self.state_slots[i] for i in self.mamba_decode_seqs]
        if not slots:
            return None
        span = consecutive_span(slots)
        if span is not None:
            return span, None
        low, high = min(slots), max(slots)
        if high - low + 1 > 2 * len(slots):
            return None
        device = self.slot_mapping.device if self.slot_mapping is not None else None
        return slice(low, high + 1), torch.tensor([s - low for s in slots], device=device)

    @cached_property
    def decode_attention_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For `single_token_seqs`: token rows (b,), padded block tables (b, max_blocks), and a mask
        (b, 1, 1, max_blocks * block_size) of the key positions each sequence may see."""
        device = self.slot_mapping.device if self.slot_mapping is not None else None
        seqs = self.single_token_seqs
        kv_lens = [self.context_lens[i] + 1 for i in seqs]
        width = max((n + self.block_size - 1) // self.block_size for n in kv_lens)
        tables = [self.block_tables[i][:width] + [0] * (width - len(self.block_tables[i][:width])) for i in seqs]
        positions = torch.arange(width * self.block_size, device=device)
        mask = positions[None, :] < torch.tensor(kv_lens, device=device)[:, None]
        return (torch.tensor([self.query_start_loc[i] for i in seqs], device=device),
                torch.tensor(tables, dtype=torch.long, device=device), mask[:, None, None, :])

    @cached_property
    def decode_context_lens(self) -> tuple[torch.Tensor, int]:
        """For `single_token_seqs`: their context lengths (b,) on the cache device, and the longest key count."""
        device = self.slot_mapping.device if self.slot_mapping is not None else None
        lens = [self.context_lens[i] for i in self.single_token_seqs]
        return torch.tensor(lens, dtype=torch.long, device=device), max(lens) + 1

    @cached_property
    def decode_block_span(self) -> slice | None:
        """A lone single-token sequence whose blocks are consecutive (one stream on a fresh cache): its keys
        are one view of the cache, no gather."""
        seqs = self.single_token_seqs
        if len(seqs) != 1:
            return None
        n = (self.context_lens[seqs[0]] + self.block_size) // self.block_size
        return consecutive_span(self.block_tables[seqs[0]][:n])

    @staticmethod
    def for_full_forward(batch_size: int, seq_len: int) -> "ForwardContext":
        """A cache-free context for `batch_size` sequences of `seq_len` tokens each."""
        return ForwardContext(
            query_start_loc=[i * seq_len for i in range(batch_size + 1)],
            context_lens=[0] * batch_size,
        )


@dataclass
class StepContext:
    """A uniform step with static shapes and no host synchronisation (the graph-safe forward, `forward_step`):
    `num_seqs` sequences, each continuing from its caches with exactly `q` new tokens (q = 1: decode; 1 + k: a
    speculative verification). Row r = s * q + j is token j of sequence s. Everything the layers index with
    is a device tensor prepared once per step, so the forward can be compiled (`fullgraph=True`) or captured
    as a CUDA graph per (num_seqs, q) bucket.

      positions     (num_seqs * q,) int64   absolute position of each row's token
      slot_mapping  (num_seqs * q,) int64   flat KV slot each row's key and value are written to
      state_slots   (num_seqs,) int64       Mamba state slot of each sequence
      block_tables  (num_seqs, max_blocks) int64, block ids (the unused tail may hold anything valid)
      saved_states  verification only: {layer: (conv (>= num_seqs, q, conv_dim, k - 1),
                                                ssm (>= num_seqs, q, H, P, N))}, filled with the state after
                    every row (the engine rolls back to the last accepted one)
    """
    num_seqs: int
    q: int
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    state_slots: torch.Tensor
    block_tables: torch.Tensor
    block_size: int
    kv_caches: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    mamba_caches: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    kv_scales: dict[int, tuple[float, float]] = field(default_factory=dict)
    saved_states: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    reference_attention: bool = False     # see ForwardContext

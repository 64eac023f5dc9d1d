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

import torch


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
    # Optional KV scales for an FP8 KV cache, by layer index: (k_scale, v_scale) floats.
    kv_scales: dict[int, tuple[float, float]] = field(default_factory=dict)

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

    @staticmethod
    def for_full_forward(batch_size: int, seq_len: int) -> "ForwardContext":
        """A cache-free context for `batch_size` sequences of `seq_len` tokens each."""
        return ForwardContext(
            query_start_loc=[i * seq_len for i in range(batch_size + 1)],
            context_lens=[0] * batch_size,
        )

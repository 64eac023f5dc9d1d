"""The Mamba-2 mixer (REFERENCE §1), over an optional per-sequence state slot.

Steps, numbered as in REFERENCE §1:
1. in_proj -> z, xBC, dt          2. causal depthwise conv1d over xBC, SiLU, split into x, B, C
3. dt = softplus(dt + dt_bias) clamped to time_step_limit; A = -exp(A_log)
4. the SSD recurrence (nemoh.models.ssd) plus the D skip     5. gated grouped RMSNorm      6. out_proj

`forward_step` is the graph-safe version for uniform steps (every sequence q new tokens; nemoh.models.
forward_context.StepContext): static shapes, state slots read and written through device index tensors.

Three ways through step 2-4 in `forward`, all the same math:
- decode (one new token for a sequence that has state): batched across such sequences, one step;
- a few new tokens with `ctx.save_intermediate_states` (speculative verification): step by step, keeping the
  state after every position so the engine can roll back;
- anything else (prefill chunks, full forward): the chunked SSD scan, starting from the slot's state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemoh.config import NemotronHConfig
from nemoh.models.forward_context import ForwardContext, StepContext
from nemoh.models.linear import Linear
from nemoh.models.norm import GatedGroupRMSNorm
from nemoh.models.ssd import ssd_chunked, ssd_step_, ssd_steps


class Mamba2Mixer(nn.Module):
    def __init__(self, config: NemotronHConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.n_groups = config.n_groups
        self.state_size = config.ssm_state_size
        self.d_inner = config.mamba_d_inner
        self.conv_dim = config.mamba_conv_dim
        self.conv_kernel = config.conv_kernel
        self.chunk_size = config.chunk_size
        self.dt_min, self.dt_max = config.time_step_limit
        self.in_proj = Linear(config.hidden_size, self.d_inner + self.conv_dim + self.num_heads,
                              bias=config.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim,
                                bias=config.use_conv_bias, padding=config.conv_kernel - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedGroupRMSNorm(self.d_inner, self.d_inner // self.n_groups, eps=config.layer_norm_epsilon)
        self.out_proj = Linear(self.d_inner, config.hidden_size, bias=config.use_bias)

    # ---- helpers ---------------------------------------------------------------------------------
    def _conv(self, xbc: torch.Tensor, prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """xbc: (t, conv_dim) new inputs, prev: (conv_dim, k-1) last inputs before them.

        Returns the activated conv output (t, conv_dim) and the padded input (conv_dim, k-1+t), whose last
        k-1 columns are the new conv state.
        """
        padded = torch.cat([prev.to(xbc.dtype), xbc.t()], dim=1)
        out = self._depthwise(padded[None], 0)[0]
        return F.silu(out.t()), padded

    def _depthwise(self, x: torch.Tensor, padding: int) -> torch.Tensor:
        """The depthwise conv1d of x (b, conv_dim, t), computed in float32 on a CPU and cast back: PyTorch's CPU
        depthwise conv in bfloat16 / float16 loops over the channels one at a time (6 Mamba layers of 1280 channels
        took 130 ms of a 512-token prefill, against ~5 ms in float32)."""
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled():
            bias = self.conv1d.bias.float() if self.conv1d.bias is not None else None
            out = F.conv1d(x.float(), self.conv1d.weight.float(), bias, padding=padding, groups=self.conv_dim)
            return out.to(x.dtype)
        return F.conv1d(x, self.conv1d.weight, self.conv1d.bias, padding=padding, groups=self.conv_dim)

    def _discretize(self, dt: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(dt.float() + self.dt_bias.float())
        return dt.clamp(self.dt_min, self.dt_max)

    def _split_xbc(self, xbc: torch.Tensor):
        """(..., conv_dim) -> x (..., h, p), B (..., g, n), C (..., g, n)."""
        x, B, C = torch.split(xbc, [self.d_inner, self.n_groups * self.state_size,
                                    self.n_groups * self.state_size], dim=-1)
        lead = xbc.shape[:-1]
        return (x.reshape(*lead, self.num_heads, self.head_dim),
                B.reshape(*lead, self.n_groups, self.state_size),
                C.reshape(*lead, self.n_groups, self.state_size))

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """hidden: (num_tokens, hidden) -> (num_tokens, hidden)."""
        proj = self.in_proj(hidden)                                                             # 1.
        z, xbc, dt = torch.split(proj, [self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        A = -torch.exp(self.A_log.float())                                                      # 3.
        dt = self._discretize(dt)
        cache = ctx.mamba_caches.get(self.layer_idx)
        y = torch.empty(hidden.shape[0], self.num_heads, self.head_dim, dtype=torch.float32, device=hidden.device)
        if cache is None:
            self._forward_uncached(xbc, dt, A, ctx, y)
        else:
            self._forward_cached(xbc, dt, A, ctx, cache, y)
        y = y.reshape(-1, self.d_inner)
        y = self.norm(y, z)                                                                     # 5.
        return self.out_proj(y.to(hidden.dtype))                                                # 6.

    def _scan(self, xbc_act: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, state: torch.Tensor | None):
        """Chunked scan of one or more equal-length sequences. xbc_act: (b, t, conv_dim), dt: (b, t, h)."""
        x, B, C = self._split_xbc(xbc_act)
        y, final = ssd_chunked(x, dt, A, B, C, self.chunk_size, state)                         # 4.
        return y + self.D.float()[:, None] * x.float(), final

    def _scan_fresh(self, xbc: torch.Tensor, dt: torch.Tensor, A: torch.Tensor):
        """Equal-length sequences from empty state: xbc (b, conv_dim, t) -> y (b, t, h, p), final state."""
        t = xbc.shape[-1]
        conv = self._depthwise(xbc, self.conv_kernel - 1)[..., :t]                              # 2.
        return self._scan(F.silu(conv.transpose(1, 2)), dt, A, None)                            # 4.

    def _forward_uncached(self, xbc, dt, A, ctx: ForwardContext, y: torch.Tensor) -> None:
        zero = xbc.new_zeros(self.conv_dim, self.conv_kernel - 1)
        lens = ctx.query_lens
        if len(set(lens)) == 1:
            b, t = len(lens), lens[0]
            out, _ = self._scan_fresh(xbc.view(b, t, -1).transpose(1, 2), dt.view(b, t, -1), A)
            y.copy_(out.reshape(b * t, self.num_heads, self.head_dim))
            return
        for s, e in zip(ctx.query_start_loc[:-1], ctx.query_start_loc[1:]):
            act, _ = self._conv(xbc[s:e], zero)
            out, _ = self._scan(act[None], dt[None, s:e], A, None)
            y[s:e] = out[0]

    def _forward_cached(self, xbc, dt, A, ctx: ForwardContext, cache, y: torch.Tensor) -> None:
        conv_cache, ssm_cache = cache
        decode_seqs = ctx.mamba_decode_seqs
        verify_groups = ctx.verify_groups
        prefill_groups = ctx.prefill_groups
        grouped = verify_groups + prefill_groups
        if len(decode_seqs) + sum(map(len, grouped)) < ctx.num_seqs:
            batched = set(decode_seqs).union(*grouped)
            for i, (s, e) in enumerate(zip(ctx.query_start_loc[:-1], ctx.query_start_loc[1:])):
                if i not in batched:
                    self._run_sequence(i, s, e, xbc, dt, A, ctx, conv_cache, ssm_cache, y)
        if decode_seqs:
            self._decode_batch(xbc, dt, A, ctx, conv_cache, ssm_cache, y)
        for group in verify_groups:
            self._verify_batch(group, xbc, dt, A, ctx, conv_cache, ssm_cache, y)
        for group in prefill_groups:
            self._prefill_batch(group, xbc, dt, A, ctx, conv_cache, ssm_cache, y)

    def _prefill_batch(self, seqs: list[int], xbc, dt, A, ctx, conv_cache, ssm_cache, y) -> None:
        """Fresh sequences with the same number of new tokens t: one conv and one chunked scan for all."""
        b, t, k1 = len(seqs), ctx.query_lens[seqs[0]], self.conv_kernel - 1
        rows, slots = ctx.group_index(seqs)
        new = xbc[rows].view(b, t, -1).transpose(1, 2)                                           # (b, c, t)
        out, final = self._scan_fresh(new, dt[rows].view(b, t, -1), A)
        y[rows] = out.reshape(b * t, self.num_heads, self.head_dim)
        # conv state: the last k-1 inputs, zeros in front when the prompt is shorter than that
        conv_cache[slots] = F.pad(new, (max(0, k1 - t), 0))[..., -k1:].to(conv_cache.dtype)
        ssm_cache[slots] = final.to(ssm_cache.dtype)

    def _verify_batch(self, seqs: list[int], xbc, dt, A, ctx, conv_cache, ssm_cache, y) -> None:
        """Speculative verification of sequences with the same number of new tokens q, all together,
        keeping the state after every position for the roll-back."""
        b, q, k1 = len(seqs), ctx.query_lens[seqs[0]], self.conv_kernel - 1
        rows, slots = ctx.group_index(seqs)
        new = xbc[rows].view(b, q, -1)
        padded = torch.cat([conv_cache[slots].to(xbc.dtype), new.transpose(1, 2)], dim=2)      # (b, c, k-1+q)
        # the depthwise conv as a windowed product: for a few positions F.conv1d's setup costs ~20x more
        conv = (padded.unfold(2, self.conv_kernel, 1) * self.conv1d.weight[:, 0, None]).sum(-1)  # 2. (b, c, q)
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias[:, None]
        x, B, C = self._split_xbc(F.silu(conv.transpose(1, 2)))
        out, states = ssd_steps(ssm_cache[slots], x, dt[rows].view(b, q, -1), A, B, C)           # 4.
        y[rows] = (out + self.D.float()[:, None] * x.float()).reshape(b * q, self.num_heads, self.head_dim)
        # conv state after position j = the k-1 inputs ending at j
        conv_states = padded.unfold(2, k1, 1)[:, :, 1:].transpose(1, 2)                          # (b, q, c, k-1)
        saved = ctx.intermediate_states.setdefault(self.layer_idx, {})
        buffers = (ctx.verify_states or {}).get(self.layer_idx)
        first, last = ctx.verify_row_offset + seqs[0], ctx.verify_row_offset + seqs[-1]
        if buffers is not None and last < buffers[0].shape[0] and q <= buffers[0].shape[1]:
            # into the engine's preallocated buffers: what every layer keeps for the roll-back is bounded by
            # their size (the memory plan's "MTP verify states"), not allocated anew each verification
            conv_buf, ssm_buf = buffers
            rows_in = slice(first, last + 1) if last - first + 1 == b else torch.tensor(
                [ctx.verify_row_offset + i for i in seqs], device=conv_buf.device)
            conv_buf[rows_in, :q] = conv_states
            ssm_buf[rows_in, :q] = states
            for i in seqs:
                saved[i] = (conv_buf[ctx.verify_row_offset + i, :q], ssm_buf[ctx.verify_row_offset + i, :q])
        else:
            conv_states, states = conv_states.to(conv_cache.dtype), states.to(ssm_cache.dtype)
            for j, i in enumerate(seqs):
                saved[i] = (conv_states[j], states[j])
        conv_cache[slots] = conv_states[:, -1].to(conv_cache.dtype)
        ssm_cache[slots] = states[:, -1].to(ssm_cache.dtype)

    def _run_sequence(self, i, s, e, xbc, dt, A, ctx, conv_cache, ssm_cache, y) -> None:
        slot = ctx.state_slots[i]
        has_state = ctx.context_lens[i] > 0
        conv_prev = conv_cache[slot] if has_state else conv_cache.new_zeros(conv_cache.shape[1:])
        ssm_prev = ssm_cache[slot].float() if has_state else None
        act, padded = self._conv(xbc[s:e], conv_prev)                                         # 2.
        if ctx.save_intermediate_states:
            x, B, C = self._split_xbc(act[None])
            init = ssm_prev[None] if ssm_prev is not None else x.new_zeros(
                1, self.num_heads, self.head_dim, self.state_size, dtype=torch.float32)
            out, states = ssd_steps(init, x, dt[None, s:e], A, B, C)                            # 4.
            out = out + self.D.float()[:, None] * x.float()
            final = states[0, -1]
            # conv state after position j = the k-1 inputs ending at j
            conv_states = padded.unfold(1, self.conv_kernel - 1, 1)[:, 1:].transpose(0, 1)
            ctx.intermediate_states.setdefault(self.layer_idx, {})[i] = (
                conv_states.to(conv_cache.dtype), states[0].to(ssm_cache.dtype))
        else:
            out, final = self._scan(act[None], dt[None, s:e], A, ssm_prev[None] if ssm_prev is not None else None)
            final = final[0]
        y[s:e] = out[0]
        conv_cache[slot] = padded[:, -(self.conv_kernel - 1):].to(conv_cache.dtype)
        ssm_cache[slot] = final.to(ssm_cache.dtype)

    def _decode_batch(self, xbc, dt, A, ctx, conv_cache, ssm_cache, y) -> None:
        rows, slots = ctx.mamba_decode_index
        window = torch.cat([conv_cache[slots].to(xbc.dtype), xbc[rows][:, :, None]], dim=2)      # (b, c, k)
        act = (window * self.conv1d.weight[:, 0]).sum(-1)                                       # 2.
        if self.conv1d.bias is not None:
            act = act + self.conv1d.bias
        act = F.silu(act)
        conv_cache[slots] = window[:, :, 1:].to(conv_cache.dtype)
        x, B, C = self._split_xbc(act)
        slot_window = ctx.mamba_decode_slot_window
        if slot_window is not None and ssm_cache.dtype == torch.float32:
            span, place = slot_window
            x_w, dt_w, B_w, C_w = x, dt[rows], B, C
            if place is not None:
                # slots out of order or with others between them: step the whole window in place, the others
                # with dt = 0 and x = 0, which leaves a state exactly as it is (decay exp(0) = 1, update 0)
                x_w, dt_w, B_w, C_w = (t.new_zeros(span.stop - span.start, *t.shape[1:]).index_copy_(0, place, t)
                                       for t in (x_w, dt_w, B_w, C_w))
            out = ssd_step_(ssm_cache[span], x_w, dt_w, A, B_w, C_w)                                # 4. in place
            if place is not None:
                out = out[place]
        else:
            state = ssm_cache[slots].float()
            out = ssd_step_(state, x, dt[rows], A, B, C)
            ssm_cache[slots] = state.to(ssm_cache.dtype)
        y[rows] = out + self.D.float()[:, None] * x.float()

    # ---- the graph-safe uniform step ---------------------------------------------------------------------
    def forward_step(self, hidden: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """hidden: (num_seqs * q, hidden) -> (num_seqs * q, hidden); q new tokens per sequence, each sequence
        continuing from its slot's state, with no host synchronisation and shapes fixed by (num_seqs, q)."""
        S, q, K1 = ctx.num_seqs, ctx.q, self.conv_kernel - 1
        proj = self.in_proj(hidden)                                                             # 1.
        z, xbc, dt = torch.split(proj, [self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        conv_cache, ssm_cache = ctx.mamba_caches[self.layer_idx]
        slots = ctx.state_slots
        padded = torch.cat([conv_cache.index_select(0, slots).to(xbc.dtype),
                            xbc.reshape(S, q, self.conv_dim).transpose(1, 2)], dim=2)           # (S, c, k-1+q)
        conv = (padded.unfold(2, self.conv_kernel, 1) * self.conv1d.weight).sum(-1)             # 2. (S, c, q)
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias[:, None]
        x, B, C = self._split_xbc(F.silu(conv.transpose(1, 2)))                                # (S, q, ...)
        A = -torch.exp(self.A_log.float())                                                      # 3.
        dt = self._discretize(dt).view(S, q, self.num_heads)
        heads_per_group = self.num_heads // self.n_groups
        Bh = B.float().repeat_interleave(heads_per_group, dim=2)                                 # (S, q, h, n)
        Ch = C.float().repeat_interleave(heads_per_group, dim=2)
        state = ssm_cache.index_select(0, slots).float()                                       # (S, h, p, n)
        ys = []
        for j in range(q):                                                                      # 4.
            xdt = x[:, j].float() * dt[:, j, :, None]                                           # (S, h, p)
            state = state * torch.exp(dt[:, j] * A)[..., None, None] + xdt[..., None] * Bh[:, j, :, None, :]
            ys.append((state * Ch[:, j, :, None, :]).sum(-1))
            if ctx.saved_states is not None:
                saved_conv, saved_ssm = ctx.saved_states[self.layer_idx]
                saved_conv[:S, j] = padded[:, :, j + 1:j + 1 + K1].to(saved_conv.dtype)
                saved_ssm[:S, j] = state.to(saved_ssm.dtype)
        conv_cache.index_copy_(0, slots, padded[:, :, -K1:].to(conv_cache.dtype))
        ssm_cache.index_copy_(0, slots, state.to(ssm_cache.dtype))
        y = torch.stack(ys, 1) + self.D.float()[:, None] * x.float()                          # (S, q, h, p)
        y = self.norm(y.reshape(S * q, self.d_inner), z)                                        # 5.
        return self.out_proj(y.to(hidden.dtype))                                                # 6.

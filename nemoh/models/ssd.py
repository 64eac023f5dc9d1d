"""The Mamba-2 state space recurrence in its two forms (REFERENCE §1, Mamba step 4).

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t (outer) B_t        y_t = h_t . C_t

`ssd_chunked` evaluates it for a whole sequence by the chunked SSD algorithm (Dao & Gu 2024, §6): within a
chunk the output is a masked (decay-weighted) C·Bᵀ product, between chunks only the state is carried, so
memory is linear in the length and any length works (the last chunk is simply shorter). `ssd_step` is the
one-token recurrence used for decode. All math runs in float32. The D skip term is added by the caller.

Shapes: b batch, t time, h heads, p head dim, g groups (h/g heads share B and C), n state size.
"""
from __future__ import annotations

import torch


# Above this many bytes of intermediate states, ssd_steps goes position by position (see there).
SSD_STEPS_BATCHED_MAX_BYTES = 512 * 1024


def _expand_groups(t: torch.Tensor, num_heads: int, dim: int) -> torch.Tensor:
    return t.repeat_interleave(num_heads // t.shape[dim], dim=dim)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (b, t, h, p), dt: (b, t, h), A: (h,), B/C: (b, t, g, n), initial_state: (b, h, p, n) or None.

    Returns y: (b, t, h, p) and the final state (b, h, p, n), both float32.
    """
    with torch.autocast(x.device.type, enabled=False):     # the scan is float32 even under autocast
        return _ssd_chunked(x, dt, A, B, C, chunk_size, initial_state)


def _ssd_chunked(x, dt, A, B, C, chunk_size, initial_state):
    bsz, seqlen, num_heads, head_dim = x.shape
    state_size = B.shape[-1]
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    state = (initial_state.float().clone() if initial_state is not None
             else x.new_zeros(bsz, num_heads, head_dim, state_size))
    ys = []
    for start in range(0, seqlen, chunk_size):
        end = min(start + chunk_size, seqlen)
        length = end - start
        xc, dtc, Bc, Cc = x[:, start:end], dt[:, start:end], B[:, start:end], C[:, start:end]
        # 1. cumulative log-decay within the chunk
        cum = torch.cumsum(dtc * A.float(), dim=1)                                  # (b, l, h)
        # 2. decay from position s to position t (s <= t), masked above the diagonal before exp
        cum_h = cum.transpose(1, 2)                                                 # (b, h, l)
        segsum = cum_h[..., :, None] - cum_h[..., None, :]                          # (b, h, l, l)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp(segsum.masked_fill(~causal, float("-inf")))
        # 3. intra-chunk output: (C_t . B_s) * decay(t, s) * dt_s * x_s, C·B computed per group
        cb = _expand_groups(torch.einsum("btgn,bsgn->bgts", Cc, Bc), num_heads, 1)  # (b, h, l, l)
        xdt = xc * dtc[..., None]                                                   # (b, l, h, p)
        y = torch.einsum("bhts,bshp->bthp", cb * decay, xdt)
        # 4. contribution of the state entering the chunk
        Ch = _expand_groups(Cc, num_heads, 2)                                       # (b, l, h, n)
        y = y + torch.einsum("bthn,bhpn->bthp", Ch, state) * torch.exp(cum)[..., None]
        ys.append(y)
        # 5. state leaving the chunk
        Bh = _expand_groups(Bc, num_heads, 2)
        to_end = torch.exp(cum[:, -1:] - cum)                                       # (b, l, h)
        state = state * torch.exp(cum[:, -1])[..., None, None] + torch.einsum(
            "bshn,bshp->bhpn", Bh * to_end[..., None], xdt)
    y = torch.cat(ys, dim=1) if ys else x.new_zeros(x.shape)
    return y, state


def ssd_step_(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> torch.Tensor:
    """One token, updating `state` in place. state: (b, h, p, n) float32, x: (b, h, p), dt: (b, h),
    B/C: (b, g, n). Returns y (b, h, p).

    In place because decode is memory-bound on the state (b·h·p·n floats): scaling by the decay and adding
    the rank-one update as a batched matmul touch it twice instead of building three temporaries.
    """
    bsz, num_heads, head_dim, state_size = state.shape
    Bh = _expand_groups(B.float(), num_heads, 1).reshape(bsz * num_heads, 1, state_size)
    Ch = _expand_groups(C.float(), num_heads, 1).reshape(bsz * num_heads, 1, state_size)
    xdt = (x.float() * dt.float()[..., None]).reshape(bsz * num_heads, head_dim, 1)
    flat = state.view(bsz * num_heads, head_dim, state_size)
    flat.mul_(torch.exp(dt.float() * A.float()).reshape(-1, 1, 1))
    flat.baddbmm_(xdt, Bh)
    # y = state C as the row product Cᵀ stateᵀ: the same sums, 1.1-3.4x faster than the product with one
    # column (`python benchmarks/ssd_steps.py`, second table; a 32-sequence step of engine_vs_hf's 16x64x64
    # states 1116 -> 420 us a layer)
    return torch.bmm(Ch, flat.transpose(1, 2)).view(bsz, num_heads, head_dim)


def ssd_step(state, x, dt, A, B, C) -> tuple[torch.Tensor, torch.Tensor]:
    """One token without touching `state`: returns y (b, h, p) and the new state (b, h, p, n)."""
    new_state = state.float().clone()
    return ssd_step_(new_state, x, dt, A, B, C), new_state


def ssd_steps(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A few tokens, keeping every intermediate state (speculative verification).

    state: (b, h, p, n), x: (b, t, h, p), dt: (b, t, h), B/C: (b, t, g, n).
    Returns y (b, t, h, p) and states (b, t, h, p, n): the state after each position (both may be views
    of head-major tensors).

    Small states (all b x t of them within 512 KiB): every position at once, as one (t x t) decay matrix times
    the rank-one updates — with c = cumsum(dt * A), h_t = exp(c_t) h_0 + sum_{s <= t} exp(c_t - c_s)
    dt_s x_s B_sᵀ, y_t = h_t C_t — which is few operators. Larger ones: one in-place step per position,
    which moves less memory. `python benchmarks/ssd_steps.py` times both.
    """
    if state.numel() * x.shape[1] * 4 > SSD_STEPS_BATCHED_MAX_BYTES:
        return _sequential_steps(state, x, dt, A, B, C)
    with torch.autocast(x.device.type, enabled=False):
        b, t, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        x, dt = x.float(), dt.float()
        cum = torch.cumsum(dt * A.float(), dim=1).transpose(1, 2)                          # (b, h, t)
        # decay[t, s] = exp(c_t - c_s) for s <= t; tril_ zeroes s > t, even where that exp overflowed
        decay = torch.exp(cum[..., :, None] - cum[..., None, :]).tril_()                   # (b, h, t, s)
        xdt = (x * dt[..., None]).permute(0, 2, 1, 3)                                      # (b, h, s, p)
        update = (xdt[..., None] * _heads_major(B, h)[..., None, :]).reshape(b, h, t, p * n)
        states = torch.matmul(decay, update).view(b, h, t, p, n)
        states.addcmul_(torch.exp(cum)[..., None, None], state.float()[:, :, None])
        y = torch.matmul(states, _heads_major(C, h)[..., None])[..., 0]                    # (b, h, t, p)
        return y.transpose(1, 2), states.transpose(1, 2)


def _heads_major(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(b, t, g, n) -> (b, h, t, n) float32, each group's rows shared by its h/g heads."""
    b, steps, g, n = t.shape
    return t.float().permute(0, 2, 1, 3)[:, :, None].expand(b, g, num_heads // g, steps, n).reshape(
        b, num_heads, steps, n)


def _sequential_steps(state, x, dt, A, B, C) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, steps = x.shape[:2]
    current = state.float().clone()
    states = current.new_empty(bsz, steps, *current.shape[1:])
    ys = []
    for i in range(steps):
        ys.append(ssd_step_(current, x[:, i], dt[:, i], A, B[:, i], C[:, i]))
        states[:, i] = current
    return torch.stack(ys, 1), states

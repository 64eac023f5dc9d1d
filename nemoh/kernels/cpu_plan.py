"""A model's layer stack as one replayable list of native CPU kernel calls: the CPU's captured step.

`StackPlan` is built once for a layer stack (the main model, or the MTP block), a capacity of sequences and a
number `q` of new tokens per sequence (1 for decode, 1 + k for a speculative verification). Building walks the
modules, takes a pointer to every weight as it is stored (bfloat16, FP8, packed NVFP4) and to the engine's
caches, and writes one argument struct per kernel call. A replay fills the input buffers (`ids`, `positions`,
`slot_mapping`, `slots`, `block_tables`), sets the row count and runs the whole list in one native call: no
Python, no operator dispatch and no host synchronisation between the kernels.

The plan computes what the model's PyTorch forward computes (nemoh/models/, the reference), in float32 with each
stored activation rounded as the model's dtype stores it; `tests/kernels/test_cpu_plan.py` checks them against
each other. The per-layer emitters below follow the modules' forward methods step by step.
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn

from nemoh.kernels import cpu_library as C
from nemoh.kernels.linear_cpu import Panels, supports
from nemoh.models.attention import Attention
from nemoh.models.linear import Linear
from nemoh.models.mamba2 import Mamba2Mixer
from nemoh.models.mlp import MLP
from nemoh.models.moe import LatentMoE


def plan_supports(model: nn.Module) -> str | None:
    """None when every layer of the model can be planned, else the reason it cannot."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ in ("NVFP4Linear", "FP8Linear"):
            if not supports(module):
                return f"{name}: no native product for this weight"
    if model.dtype not in C.ROUNDING:
        return f"model dtype {model.dtype}"
    return None


def f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous()


class _Entries:
    """Kernel calls in order, with everything their argument structs point at kept alive."""

    def __init__(self, lib: C.CpuLibrary):
        self.lib = lib
        self.calls: list[tuple[int, ctypes.Structure]] = []
        self.keep: list[object] = []

    def add(self, kernel: str, args: ctypes.Structure) -> None:
        self.calls.append((self.lib.address[kernel], args))

    def hold(self, obj):
        self.keep.append(obj)
        return obj

    def array(self) -> ctypes.Array:
        entries = (C.PlanEntry * len(self.calls))()
        for i, (fn, args) in enumerate(self.calls):
            entries[i].fn, entries[i].args = fn, ctypes.addressof(args)
        return entries


class StackPlan:
    """One step of `layers` for up to `max_seqs` sequences of `q` new tokens each.

    Main stack: `embed` is the token embedding; the output is the hidden state after `final_norm` (`hidden`),
    and the logits of every row (`logits`) with their argmax (`argmax`). MTP stack (`mtp` given): the input is
    (token, hidden) per row as the MTP block takes it, `final_norm` is its final_layernorm; with `select_rows`
    only one row per sequence (chosen by `select`) goes through the LM head.
    """

    def __init__(self, model: nn.Module, layers: nn.ModuleList, final_norm: nn.Module, caches: "PlanCaches",
                 max_seqs: int, q: int, max_blocks: int, save_states: bool = False, mtp: nn.Module | None = None,
                 select_rows: bool = False, panels: Panels | None = None, lib: C.CpuLibrary | None = None):
        self.lib = lib or C.library()
        if self.lib is None:
            raise RuntimeError("the native CPU kernels are not available")
        # every weight as the kernels read it fastest (one copy per weight, shared by an engine's plans)
        self.panels = panels or Panels(self.lib)
        cfg = model.config
        self.model, self.q, self.max_seqs = model, q, max_seqs
        self.round = C.ROUNDING[model.dtype]
        self.hidden = h = cfg.hidden_size
        self.vocab = cfg.vocab_size
        rows = max_seqs * q
        self.max_rows = rows
        self.shape = C.StepShape(0, 0)
        self._shape_ptr = ctypes.addressof(self.shape)
        self.entries = _Entries(self.lib)
        e = self.entries
        z = lambda *s, dtype=torch.float32: torch.zeros(*s, dtype=dtype)     # noqa: E731
        # inputs
        self.ids = z(rows, dtype=torch.int64)
        self.positions = z(rows, dtype=torch.int64)
        self.slot_mapping = z(rows, dtype=torch.int64)
        self.slots = z(max_seqs, dtype=torch.int64)
        self.block_tables = z(max_seqs, max_blocks, dtype=torch.int32)
        self.hidden_in = z(rows, h) if mtp is not None else None
        self.select = z(max_seqs, dtype=torch.int64) if select_rows else None
        # activations
        self.x, self.xn = z(rows, h), z(rows, h)
        self.out = z(rows, h)                           # after the final norm
        head_rows = max_seqs if select_rows else rows
        # a row-selecting plan: the selected rows' residual stream, then (in place) their final-norm output
        self.selected = z(max_seqs, h) if select_rows else None
        self._rows = 0                                  # rows of the kernels emitted now: all, or PER_SEQUENCE
        self.logits = z(head_rows, self.vocab)
        self.argmax = z(head_rows, dtype=torch.int64)
        self.caches = caches
        self.save_states = save_states
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scratch: dict[str, torch.Tensor] = {}
        self.max_blocks = max_blocks

        self._embed(model.backbone.embeddings.weight, self.x if mtp is None else self.xn)
        if mtp is not None:
            self._mtp_input(layers[0])
        # A row-selecting plan needs every row only as far as the last layer that keeps a cache (its KV must be
        # complete); from there on only the selected row of each sequence goes on (as `run_layers` does).
        split = len(layers)
        if select_rows:
            split = 1 + max((j for j, layer in enumerate(layers) if layer.layer_type in ("mamba", "attention")),
                            default=-1)
        for layer in layers[:split]:
            self._layer(layer)
        if select_rows:
            self._add("nemoh_gather_rows", C.GatherRowsArgs, shape=self._shape_ptr, count=0,
                      idx=self.select.data_ptr(), x=self.x.data_ptr(), x_stride=h, y=self.selected.data_ptr(),
                      y_stride=h, width=h)
            self.entries.hold((self.x, self.xn))       # the kernels emitted so far still point at them
            self.x, self.xn, self._rows = self.selected, self.entries.hold(z(max_seqs, h)), C.PER_SEQUENCE
        for layer in layers[split:]:
            self._layer(layer)
        final = self.selected if select_rows else self.out
        self._rmsnorm(self.x, final, final_norm, None)
        self._linear(final, self.logits, model.lm_head)
        self._add("nemoh_argmax", C.ArgmaxArgs, shape=self._shape_ptr, rows=0, logits=self.logits.data_ptr(),
                  stride=self.vocab, vocab=self.vocab, out=self.argmax.data_ptr())
        self.array = e.array()
        self.count = len(e.calls)
        self.profile: torch.Tensor | None = None

    # ---- running ------------------------------------------------------------------------------------------
    def run(self, num_seqs: int) -> None:
        """Replay the step for `num_seqs` sequences whose inputs are already in the input buffers."""
        if not 0 < num_seqs <= self.max_seqs:
            raise ValueError(f"num_seqs {num_seqs} outside (0, {self.max_seqs}]")
        self.shape.num_seqs = num_seqs
        self.shape.num_rows = num_seqs * self.q
        self.lib.run_plan(self.array, self.count, self.profile)

    def start_profile(self) -> None:
        """From now on each replay adds every kernel call's time to `self.profile` (nanoseconds)."""
        self.profile = torch.zeros(self.count, dtype=torch.int64)

    def profile_table(self) -> list[tuple[str, float]]:
        """(kernel, total milliseconds) per kind of kernel, largest first."""
        totals: dict[str, float] = {}
        for (fn, _), ns in zip(self.entries.calls, self.profile.tolist()):
            name = self.lib.kernel_name(fn)
            totals[name] = totals.get(name, 0.0) + ns / 1e6
        return sorted(totals.items(), key=lambda kv: -kv[1])

    # ---- emitters -----------------------------------------------------------------------------------------
    def _add(self, kernel: str, struct: type, **fields) -> ctypes.Structure:
        if fields.get("rows") == 0:
            fields["rows"] = self._rows
        args = struct(**{k: v for k, v in fields.items() if v is not None})
        self.entries.add(kernel, args)
        return args

    def _buf(self, name: str, *shape: int, dtype=torch.float32) -> torch.Tensor:
        """A scratch activation buffer shared by the layers that need one of this name (grown to the largest)."""
        t = self._scratch.get(name)
        if t is None or t.numel() < int(torch.tensor(shape).prod()):
            t = self.entries.hold(torch.zeros(*shape, dtype=dtype))
            self._scratch[name] = t
        return t

    def _f32(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else self.entries.hold(f32(t))

    def _embed(self, table: torch.Tensor, out: torch.Tensor) -> None:
        table = self.entries.hold(table.detach().contiguous())
        self._add("nemoh_embed", C.EmbedArgs, shape=self._shape_ptr, rows=0, ids=self.ids.data_ptr(),
                  table=table.data_ptr(), table_format=C.DTYPE_FORMATS[table.dtype], hidden=self.hidden,
                  x=out.data_ptr(), x_stride=out.stride(0))

    def _rmsnorm(self, x: torch.Tensor, y: torch.Tensor, norm: nn.Module, rows, y_offset: int = 0,
                 y_stride: int | None = None) -> None:
        w = self._f32(norm.weight)
        self._add("nemoh_rmsnorm", C.RMSNormArgs, shape=self._shape_ptr, rows=0, x=x.data_ptr(),
                  x_stride=x.stride(0), y=y.data_ptr() + 4 * y_offset, y_stride=y_stride or y.stride(0),
                  weight=w.data_ptr(), hidden=w.numel(), eps=norm.eps, round=self.round)

    def _linear(self, x: torch.Tensor, y: torch.Tensor, module: nn.Module, epilogue: int = C.STORE,
                y_offset: int = 0) -> None:
        bias = getattr(module, "bias", None)
        w = self.panels.descriptor(module, self._f32(bias) if bias is not None else None)
        # the tensors the descriptor points at stay alive with the plan, even if the module is later re-pointed
        self.entries.hold([t for t in module.buffers()] + [t for t in module.parameters()])
        self._add("nemoh_linear", C.LinearArgs, shape=self._shape_ptr, rows=0, x=x.data_ptr(),
                  x_stride=x.stride(0), y=y.data_ptr() + 4 * y_offset, y_stride=y.stride(0), w=w,
                  epilogue=epilogue, round=self.round)

    def _mtp_input(self, first: nn.Module) -> None:
        """h' = eh_proj(cat(enorm(embed(token)), hnorm(hidden))) into the residual stream x."""
        h, rows = self.hidden, self.max_rows
        cat = self._buf("mtp_cat", rows, 2 * h)
        self._rmsnorm(self.xn, cat, first.enorm, None, y_offset=0, y_stride=2 * h)
        self._rmsnorm(self.hidden_in, cat, first.hnorm, None, y_offset=h, y_stride=2 * h)
        self._linear(cat, self.x, first.eh_proj)

    def _layer(self, layer: nn.Module) -> None:
        self._rmsnorm(self.x, self.xn, layer.norm, None)
        mixer = layer.mixer
        if isinstance(mixer, Mamba2Mixer):
            self._mamba(mixer)
        elif isinstance(mixer, Attention):
            self._attention(mixer)
        elif isinstance(mixer, LatentMoE):
            self._moe(mixer)
        elif isinstance(mixer, MLP):
            hbuf = self._buf("mlp_h", self.max_rows, mixer.up_proj.out_features)
            self._linear(self.xn, hbuf, mixer.up_proj, C.RELU2)
            self._linear(hbuf, self.x, mixer.down_proj, C.ADD)
        else:
            raise TypeError(f"no CPU plan for a {type(mixer).__name__} layer")

    def _mamba(self, m: Mamba2Mixer) -> None:
        rows = self.max_rows
        width = m.in_proj.out_features
        proj = self._buf("mamba_proj", rows, width)
        xbc = self._buf("mamba_xbc", rows, m.conv_dim)
        y = self._buf("mamba_y", rows, m.d_inner)
        self._linear(self.xn, proj, m.in_proj)                                                 # 1.
        conv_cache, ssm_cache = self.caches.mamba[m.layer_idx]
        saved_conv = saved_ssm = None
        if self.save_states:
            shared = (self.caches.verify_states or {}).get(m.layer_idx)
            if shared is not None and shared[0].shape[:2] == (self.max_seqs, self.q):
                saved_conv, saved_ssm = shared           # (max_seqs, q, ...) row-major, as the kernel writes them
            else:
                saved_conv = self.entries.hold(torch.zeros(self.max_seqs, self.q, *conv_cache.shape[1:],
                                                           dtype=conv_cache.dtype))
                saved_ssm = self.entries.hold(torch.zeros(self.max_seqs, self.q, *ssm_cache.shape[1:],
                                                          dtype=ssm_cache.dtype))
            self.saved[m.layer_idx] = (saved_conv, saved_ssm)
        w = self._f32(m.conv1d.weight.reshape(m.conv_dim, m.conv_kernel))
        bias = self._f32(m.conv1d.bias)
        self._add("nemoh_mamba", C.MambaArgs, shape=self._shape_ptr, q=self.q, proj=proj.data_ptr(),
                  proj_stride=width, slots=self.slots.data_ptr(), conv_cache=conv_cache.data_ptr(),
                  conv_format=C.DTYPE_FORMATS[conv_cache.dtype], ssm_format=C.DTYPE_FORMATS[ssm_cache.dtype],
                  ssm_cache=ssm_cache.data_ptr(), conv_weight=w.data_ptr(), conv_bias=C.ptr(bias),
                  dt_bias=self._f32(m.dt_bias).data_ptr(),
                  A=self.entries.hold(-torch.exp(m.A_log.detach().float())).data_ptr(),
                  D=self._f32(m.D).data_ptr(), norm_weight=self._f32(m.norm.weight).data_ptr(),
                  num_heads=m.num_heads, head_dim=m.head_dim, n_groups=m.n_groups, state_size=m.state_size,
                  conv_kernel=m.conv_kernel, dt_min=m.dt_min, dt_max=m.dt_max, eps=m.norm.eps, round=self.round,
                  xbc=xbc.data_ptr(), y=y.data_ptr(), y_stride=m.d_inner, saved_conv=C.ptr(saved_conv),
                  saved_ssm=C.ptr(saved_ssm))
        self._linear(y, self.x, m.out_proj, C.ADD)                                              # 6.

    def _attention(self, m: Attention) -> None:
        rows, hd = self.max_rows, m.head_dim
        width = (m.num_heads + 2 * m.num_kv_heads) * hd
        qkv = self._buf("attn_qkv", rows, width)
        out = self._buf("attn_out", rows, m.num_heads * hd)
        # q, k and v side by side in one buffer, each from its own (possibly quantized) projection; the eager
        # path's fused copy of the weights first, so that the descriptors point into it
        projections = (m.q_proj, m.k_proj, m.v_proj)
        if all(type(p) is Linear for p in projections):
            m._qkv_weight.get([p.weight for p in projections])
        self._linear(self.xn, qkv, m.q_proj)
        self._linear(self.xn, qkv, m.k_proj, y_offset=m.num_heads * hd)
        self._linear(self.xn, qkv, m.v_proj, y_offset=(m.num_heads + m.num_kv_heads) * hd)
        k_cache, v_cache = self.caches.kv[m.layer_idx]
        k_scale, v_scale = self.caches.kv_scales.get(m.layer_idx, (1.0, 1.0))
        self._add("nemoh_attention", C.AttentionArgs, shape=self._shape_ptr, q=self.q, qkv=qkv.data_ptr(),
                  qkv_stride=width, positions=self.positions.data_ptr(), slot_mapping=self.slot_mapping.data_ptr(),
                  block_tables=self.block_tables.data_ptr(), max_blocks=self.max_blocks,
                  k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(),
                  cache_format=C.DTYPE_FORMATS[k_cache.dtype], k_scale=k_scale, v_scale=v_scale,
                  block_size=k_cache.shape[1], num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=hd,
                  sm_scale=m.scale, round=self.round, out=out.data_ptr(), out_stride=m.num_heads * hd)
        self._linear(out, self.x, m.o_proj, C.ADD)

    def _moe(self, m: LatentMoE) -> None:
        rows, h = self.max_rows, self.hidden
        gate = m.gate
        k = gate.top_k
        logits = self._buf("moe_logits", rows, m.num_experts)
        ids = self._buf("moe_ids", rows, k, dtype=torch.int32)
        weights = self._buf("moe_weights", rows, k)
        # 1. router logits in float32 whatever the model dtype (TopKRouter keeps its weight float32)
        router = self.entries.hold(f32(gate.weight))
        plain = C.Weight(format=C.FORMAT_F32, n=m.num_experts, k=h, data=router.data_ptr(), scale=1.0)
        packed, tensors = self.lib.pack_panels(plain)
        self.entries.hold(tensors)
        self._add("nemoh_linear", C.LinearArgs, shape=self._shape_ptr, rows=0, x=self.xn.data_ptr(), x_stride=h,
                  y=logits.data_ptr(), y_stride=m.num_experts, w=packed, epilogue=C.STORE, round=C.ROUND_NONE)
        self._add("nemoh_route", C.RouteArgs, shape=self._shape_ptr, rows=0, logits=logits.data_ptr(),
                  logits_stride=m.num_experts, bias=self._f32(gate.e_score_correction_bias).data_ptr(),
                  num_experts=m.num_experts, top_k=k, n_group=gate.n_group, topk_group=gate.topk_group,
                  norm_topk=int(gate.norm_topk_prob), scaling=gate.routed_scaling_factor, ids=ids.data_ptr(),
                  weights=weights.data_ptr())
        width = m.latent_size or h
        u = self.xn
        if m.latent_size is not None:                                                          # 4.
            u = self._buf("moe_u", rows, width)
            self._linear(self.xn, u, m.fc1_latent_proj)
        routed = self._buf("moe_routed", rows, width)
        if m._projections()[2]:
            m._stacked_weights()     # the eager path's stacked copy first: the descriptors point into it
        ups = (C.Weight * m.num_experts)(*[self.panels.descriptor(e.up_proj) for e in m.experts])
        downs = (C.Weight * m.num_experts)(*[self.panels.descriptor(e.down_proj) for e in m.experts])
        self.entries.hold((ups, downs, [t for e in m.experts for t in list(e.parameters()) + list(e.buffers())]))
        self._add("nemoh_experts", C.ExpertsArgs, shape=self._shape_ptr, rows=0, u=u.data_ptr(), u_stride=width,
                  ids=ids.data_ptr(), weights=weights.data_ptr(), top_k=k, up=ctypes.addressof(ups),
                  down=ctypes.addressof(downs), num_experts=m.num_experts, out=routed.data_ptr(),
                  out_stride=width, round=self.round)
        total = self._buf("moe_total", rows, h)
        if m.latent_size is not None:
            self._linear(routed, total, m.fc2_latent_proj)
        else:
            self._add("nemoh_add", C.AddArgs, shape=self._shape_ptr, rows=0, x=total.data_ptr(), x_stride=h,
                      a=routed.data_ptr(), a_stride=h, width=h, round=C.ROUND_NONE)   # total was zero
        shared_h = self._buf("moe_shared_h", rows, m.shared_experts.up_proj.out_features)           # 5.
        self._linear(self.xn, shared_h, m.shared_experts.up_proj, C.RELU2)
        self._linear(shared_h, total, m.shared_experts.down_proj, C.ADD)
        self._add("nemoh_add", C.AddArgs, shape=self._shape_ptr, rows=0, x=self.x.data_ptr(), x_stride=h,
                  a=total.data_ptr(), a_stride=h, width=h, round=self.round)


class PlanCaches:
    """The engine's cache tensors as a plan sees them: {layer: (k, v)}, {layer: (conv, ssm)}, FP8 KV scales, and
    the buffers of a verification's per-position Mamba states, {layer: (conv (rows, q, ...), ssm (rows, q, ...))}
    (the engine's one set, shared with its eager verifications; None: each verifying plan makes its own)."""

    def __init__(self, kv: dict, mamba: dict, kv_scales: dict | None = None, verify_states: dict | None = None):
        self.kv, self.mamba, self.kv_scales = kv, mamba, kv_scales or {}
        self.verify_states = verify_states

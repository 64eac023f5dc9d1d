"""LatentMoE (REFERENCE §1): sigmoid router with group-limited top-k, relu2 experts in a latent width,
and a shared expert on the original input."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemoh.config import NemotronHConfig
from nemoh.kernels import cpu_library
from nemoh.kernels.triton_support import HAVE_TRITON
from nemoh.models.fused import SharedWeight
from nemoh.models.linear import Linear
from nemoh.models.mlp import MLP, relu2
from nemoh.quant.fp8 import dequantize_fp8
from nemoh.quant.nvfp4 import dequantize_nvfp4


# Token counts for which inference runs the experts as one batched product padded to the busiest expert:
# above the range the padding costs more than it saves. float32's grouped product builds no kernels (see
# below), so it keeps fewer than 8 tokens (a verification's 4: a tie with experts from memory, 2.6% slower
# steps on the demo model, whose experts stay in cache) and overtakes the padded one sooner.
PADDED_TOKENS = range(2, 129)
PADDED_TOKENS_FLOAT32 = range(8, 33)
# In bfloat16 / float16 the grouped product gives each expert's rows to oneDNN as a matmul of that row count,
# and oneDNN builds a kernel per new shape: with counts that change every batch (training, prefill) the builds
# cost more than the products (`python benchmarks/moe_experts.py`: 2048 tokens 51 -> 12-15 ms, a training
# step of 2048 tokens 3.6-4.5x faster, over runs). From this many (token, expert) pairs each expert's rows
# are padded with zero rows to a multiple of GROUP_ROWS, so that a few dozen shapes recur. float32 takes
# another path that builds nothing, and padding only slows it.
GROUP_ROWS = 64
GROUP_PAD_MIN_PAIRS = 512


class TopKRouter(nn.Module):
    """Router weights stay float32 whatever the model dtype: the choice of experts is sensitive to rounding."""

    keep_fp32 = True

    def __init__(self, config: NemotronHConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (num_tokens, hidden) -> (topk_weights (num_tokens, k) fp32, topk_ids (num_tokens, k))."""
        with torch.autocast(x.device.type, enabled=False):       # routing stays fp32 under autocast too
            logits = F.linear(x.float(), self.weight.float())                                 # 1.
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias.float()                               # 2.
        if self.n_group > 1:
            n = x.shape[0]
            grouped = choice.view(n, self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)                              # (n, n_group)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(n, -1)
        topk_ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, topk_ids)                                                   # 3.
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, topk_ids


class LatentMoE(nn.Module):
    # expert parallel (nemoh.distributed): this rank holds routed experts [start, stop) as self.experts[0 ..];
    # None: every expert
    expert_range: tuple[int, int] | None = None

    def __init__(self, config: NemotronHConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = config.n_routed_experts
        self.latent_size = config.moe_latent_size
        expert_width = config.moe_latent_size or config.hidden_size
        self.gate = TopKRouter(config)
        self.experts = nn.ModuleList(
            MLP(expert_width, config.moe_intermediate_size, bias=config.mlp_bias) for _ in range(self.num_experts))
        self.shared_experts = MLP(config.hidden_size, config.moe_shared_expert_intermediate_size,
                                  bias=config.mlp_bias)
        if self.latent_size is not None:
            self.fc1_latent_proj = Linear(config.hidden_size, self.latent_size, bias=config.mlp_bias)
            self.fc2_latent_proj = Linear(self.latent_size, config.hidden_size, bias=config.mlp_bias)
        self._up, self._down = SharedWeight(stack=True), SharedWeight(stack=True)
        self._cached_projections: tuple | None = None
        self._quant_stacks: dict[tuple[str, str], SharedWeight] = {}
        self._kernel_experts = None             # the experts as the GPU kernels read them (made on first use)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (num_tokens, hidden) -> (num_tokens, hidden)."""
        weights, ids = self.gate(x)
        u = self.fc1_latent_proj(x) if self.latent_size is not None else x                   # 4.
        if self.expert_range is None:
            routed = self._run_experts(u, weights, ids)
        else:
            routed = self._run_local_experts(u, weights, ids)
        if self.latent_size is not None:
            routed = self.fc2_latent_proj(routed)
        # 5. the shared expert reads the original x (not the latent u), under expert parallelism too
        return routed + self.shared_experts(x)

    def _run_local_experts(self, u: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Expert parallel: (num_tokens, width), the weighted sum over the chosen experts that this rank holds
        (zero rows for tokens that chose none of them); the layer's all-reduce adds the other ranks' experts.
        Each (token, local expert) pair is run as a token of its own with k = 1."""
        start, stop = self.expert_range
        token, which = ((ids >= start) & (ids < stop)).nonzero(as_tuple=True)
        out = torch.zeros_like(u)
        if token.numel():
            pair = self._run_experts(u[token], weights[token, which][:, None], (ids[token, which] - start)[:, None])
            out.index_add_(0, token, pair)
        return out

    def _run_experts(self, u: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(num_tokens, width): each token's weighted sum over its experts' outputs. Inference takes the fused
        Triton kernels on a GPU and the native kernel on a CPU (nemoh/kernels/moe_cpu.py) where they are
        available; the PyTorch paths below are the reference and train the model."""
        fused = self._gpu_experts(u, weights, ids)
        if fused is not None:
            return fused
        if (u.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and cpu_library.library() is not None):
            from nemoh.kernels.moe_cpu import native_experts

            return native_experts(self, u, weights, ids, cpu_library.library())
        if ids.shape[0] == 1 and not torch.is_grad_enabled():
            return self._one_token_experts(u, weights, ids)
        return self._sorted_experts(u, weights, ids)

    def _sorted_experts(self, u: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Group the (token, expert) pairs by expert, run the experts on their pairs, then add each pair's
        weighted output to its token's row."""
        num_tokens, top_k = ids.shape
        flat_ids = ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        token_of_pair = order // top_k
        inputs = u[token_of_pair]                                     # (num_tokens * k, width), expert-sorted
        if self._projections()[2]:
            if num_tokens in padded_tokens(u.dtype) and not torch.is_grad_enabled():
                pair_out = self._padded_experts(inputs, counts, flat_ids[order])
            else:
                pair_out = self._grouped_experts(inputs, counts)
        else:
            pair_out = self._looped_experts(inputs, counts.tolist())
        pair_out = pair_out.float() * weights.reshape(-1)[order, None]
        out = torch.zeros(num_tokens, pair_out.shape[1], dtype=torch.float32, device=u.device)
        return out.index_add_(0, token_of_pair, pair_out).to(u.dtype)

    def _projections(self) -> tuple[tuple[nn.Module, ...], tuple[nn.Module, ...], bool]:
        """(up modules, down modules, whether all are dense `Linear`s without bias), cached: looking them up
        through nn.Module attributes costs more than a small expert's matmul. Rebuilt when the modules are
        swapped (quantization replaces them)."""
        cached = self._cached_projections
        first, last = self.experts[0], self.experts[-1]
        if cached is None or cached[0][0] is not first.up_proj or cached[1][-1] is not last.down_proj:
            ups = tuple(e.up_proj for e in self.experts)
            downs = tuple(e.down_proj for e in self.experts)
            plain = all(type(p) is Linear and p.bias is None for p in ups + downs)
            self._cached_projections = cached = (ups, downs, plain)
        return cached

    def _grouped_experts(self, inputs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every expert in one grouped matmul per projection. On this project's 2-core CPU, 128 (token,
        expert) pairs over 16 experts take 1.5 ms against 29 ms for one matmul per expert (each new row
        count makes oneDNN build a kernel), and training's forward + backward is 2.6x faster."""
        rows = None
        if inputs.shape[0] >= GROUP_PAD_MIN_PAIRS and inputs.dtype != torch.float32:
            inputs, counts, rows = _pad_groups(inputs, counts, GROUP_ROWS)
        offs = counts.cumsum(0).to(torch.int32)
        if torch.is_grad_enabled():
            # stacked afresh so that the gradients reach each expert's own parameter
            ups, downs, _ = self._projections()
            up = torch.stack([p.weight for p in ups])
            down = torch.stack([p.weight for p in downs])
        else:
            up, down = self._stacked_weights()
        hidden = relu2(F.grouped_mm(inputs, up.to(inputs.dtype).transpose(1, 2), offs=offs))
        out = F.grouped_mm(hidden, down.to(inputs.dtype).transpose(1, 2), offs=offs)
        return out if rows is None else out[rows]

    def _padded_experts(self, inputs: torch.Tensor, counts: torch.Tensor, expert_of_pair: torch.Tensor) -> torch.Tensor:
        """Every expert in one batched product per projection, each expert's pairs padded to the busiest
        expert's count. With the experts read from memory, as in a model's step (`python
        benchmarks/moe_experts.py`, 16 experts of 256 -> 512, a skewed new routing each call, 8 layers in
        turn), bfloat16: 32 tokens 1.40 vs 1.82 ms for the grouped product, 512 tokens 9.4 vs 6.6 ms;
        float32: 8 tokens 2.42 vs 2.78 ms, 32 tokens 2.54 vs 2.99, 128 tokens 6.42 vs 4.70. In the engine, a
        float32 decode step of engine_vs_hf's checkpoint, steps alternating between the two: 32 sequences
        78.0 vs 85.0 ms, 8 sequences 40.2 vs 43.0 ms."""
        up, down = self._stacked_weights()
        starts = counts.cumsum(0) - counts
        slot = torch.arange(len(expert_of_pair), device=inputs.device) - starts[expert_of_pair]
        padded = inputs.new_zeros(self.num_experts, int(counts.max()), inputs.shape[1])
        padded[expert_of_pair, slot] = inputs
        hidden = relu2(torch.bmm(padded, up.to(inputs.dtype).transpose(1, 2)))
        return torch.bmm(hidden, down.to(inputs.dtype).transpose(1, 2))[expert_of_pair, slot]

    def _stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, I, L) and (E, L, I): every expert's up / down weight in one tensor each (no extra copy)."""
        ups, downs, _ = self._projections()
        return self._up.get([p.weight for p in ups]), self._down.get([p.weight for p in downs])

    def _looped_experts(self, inputs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Quantized experts (NVFP4 / FP8 modules): one call per expert that has pairs."""
        ups, downs, _ = self._projections()
        outputs, start = [], 0
        for up, down, count in zip(ups, downs, counts):
            if count:
                outputs.append(down(relu2(up(inputs[start:start + count]))))
                start += count
        return torch.cat(outputs)

    # ---- the graph-safe uniform step ---------------------------------------------------------------------
    def forward_step(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` with no host synchronisation and no data-dependent shapes: x (n, hidden) -> (n, hidden)."""
        weights, ids = self.gate(x)
        u = self.fc1_latent_proj(x) if self.latent_size is not None else x                   # 4.
        routed = self._gathered_experts(u, weights, ids)
        if self.latent_size is not None:
            routed = self.fc2_latent_proj(routed)
        return routed + self.shared_experts(x)                                               # 5.

    def _gathered_experts(self, u: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each row's k experts from weights gathered by expert id (n * k <= experts: a decode batch reads only
        the chosen experts) or every expert on every row (larger batches), each then summed with its routing
        weight; shapes depend only on (n, k). Quantized experts are dequantised after the gather. On a GPU the
        fused Triton kernels (sync-free as well) take their place."""
        fused = self._gpu_experts(u, weights, ids)
        if fused is not None:
            return fused
        n, k = ids.shape
        up, down = self._expert_weights(u.dtype, ids.reshape(-1) if n * k <= self.num_experts else None)
        if n * k <= self.num_experts:
            hidden = relu2(torch.einsum("rl,rkil->rki", u, up.view(n, k, *up.shape[1:])))
            out = torch.einsum("rki,rkli->rkl", hidden, down.view(n, k, *down.shape[1:]))
        else:
            hidden = relu2(torch.einsum("rl,eil->eri", u, up))
            out = torch.einsum("eri,eli->erl", hidden, down)                                 # (E, n, L)
            out = out[ids, torch.arange(n, device=u.device)[:, None]]                        # (n, k, L)
        return (out.float() * weights[..., None]).sum(1).to(u.dtype)

    def _gpu_experts(self, u: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        """The routed experts by the fused Triton kernels (nemoh/kernels/moe_triton.py) for bfloat16 activations
        on a GPU at inference, else None."""
        if not (u.is_cuda and HAVE_TRITON and u.dtype == torch.bfloat16) or torch.is_grad_enabled():
            return None
        from nemoh.kernels.moe_triton import fused_experts
        from nemoh.kernels.packed_weights import stack_experts

        if self._kernel_experts is None:
            self._kernel_experts = stack_experts(self)
        return fused_experts(u.contiguous(), weights, ids, self._kernel_experts)

    def _expert_weights(self, dtype: torch.dtype, ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Up (m, I, L) and down (m, L, I) weights in `dtype` of experts `ids` (every expert when None), read
        from one stacked tensor per stored tensor (the modules' own storage, see SharedWeight)."""
        ups, downs, plain = self._projections()
        if plain:
            up, down = self._stacked_weights()
            if ids is not None:
                up, down = up.index_select(0, ids), down.index_select(0, ids)
            return up.to(dtype), down.to(dtype)
        return tuple(_dequantized(modules[0].scheme, lambda name: self.stacked_expert_tensor(which, name), dtype,
                                  ids) for which, modules in (("up", ups), ("down", downs)))

    def stacked_expert_tensor(self, which: str, name: str) -> torch.Tensor:
        """(E, ...): tensor `name` ("weight", "weight_scale", ...) of every expert's `which` ("up" / "down")
        projection in one tensor, of which the experts' own tensors are views from then on (made once; see
        SharedWeight). Quantized experts are read this way by the graph-safe step and the GPU kernels."""
        modules = self._projections()[0 if which == "up" else 1]
        shared = self._quant_stacks.setdefault((which, name), SharedWeight(stack=True))
        return shared.get([getattr(m, name) for m in modules])

    def _one_token_experts(self, u: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """A decode step's single token: its k experts one after another, with no sorting or scatter. The
        grouped product runs a matmul for every expert, the empty ones too (12 of the demo model's 16 for one
        token): `python benchmarks/moe_experts.py`, first table."""
        ups, downs, plain = self._projections()
        if plain:       # the weights directly: a module call costs about as much as a tiny matmul
            up_w, down_w = self._stacked_weights()
            outs = [downs[e].packed_weight.linear(relu2(ups[e].packed_weight.linear(u, up_w[e])), down_w[e])
                    for e in ids[0].tolist()]
        else:
            outs = [downs[e](relu2(ups[e](u))) for e in ids[0].tolist()]
        return (torch.cat(outs).float() * weights[0, :, None]).sum(0, keepdim=True).to(u.dtype)


def _dequantized(scheme: str, stacked, dtype: torch.dtype, ids: torch.Tensor | None) -> torch.Tensor:
    """Experts `ids` (all when None) of one projection of quantized experts, dequantised as nemoh.quant does:
    stacked(name) is the (E, ...) tensor of that name, gathered by expert id first."""
    def pick(name: str) -> torch.Tensor:
        whole = stacked(name)
        return whole if ids is None else whole.index_select(0, ids)

    if scheme == "nvfp4":
        return dequantize_nvfp4(pick("weight"), pick("weight_scale"), pick("weight_scale_2"), dtype)
    return dequantize_fp8(pick("weight"), pick("weight_scale"), dtype)


def padded_tokens(dtype: torch.dtype) -> range:
    """The token counts for which inference runs the experts as one padded batched product."""
    return PADDED_TOKENS_FLOAT32 if dtype == torch.float32 else PADDED_TOKENS


def _pad_groups(inputs: torch.Tensor, counts: torch.Tensor, multiple: int):
    """(padded inputs, padded counts, row of each input in the padded inputs): expert-sorted rows with each
    expert's group grown to a multiple of `multiple` by zero rows (a zero row stays zero through relu2
    experts and gets no gradient)."""
    padded_counts = (counts + multiple - 1) // multiple * multiple
    shift = (padded_counts.cumsum(0) - padded_counts) - (counts.cumsum(0) - counts)
    rows = torch.arange(inputs.shape[0], device=inputs.device) + shift.repeat_interleave(counts)
    padded = inputs.new_zeros(int(padded_counts.sum()), inputs.shape[1]).index_copy(0, rows, inputs)
    return padded, padded_counts, rows

"""The per-rank model and which part of each checkpoint tensor a rank reads.

`build_local_model` makes the module tree of one rank on the meta device (the layers of
`ParallelLayout.local_config`, the vocabulary-parallel embedding, a head of this rank's vocabulary rows, the
layer-loop reductions); the loader quantizes it by the checkpoint's config, `keep_local_experts` then drops the
other ranks' experts (after quantization, so that per-module quantization entries keep their global names).

`tensor_slice(name, shape, ...)` is the sharding rule per layer kind: the rows (output features) or columns
(input features) of the stored tensor a rank reads. Column ranges are given in the layer's logical input width
and scaled by the stored width, which splits packed NVFP4 weights (two codes per byte) and their scales (one per
16 inputs) on the same boundaries; per-tensor scalars (FP8 / NVFP4 scales, input scales) are read whole.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from nemoh.config import NemotronHConfig
from nemoh.distributed.collectives import TPGroup
from nemoh.distributed.layers import VocabParallelEmbedding
from nemoh.distributed.layout import ParallelLayout

LAYER_RE = re.compile(r"^(backbone|mtp)\.layers\.(\d+)\.mixer\.(.+)$")
EXPERT_RE = re.compile(r"^experts\.(\d+)\.(.+)$")


@dataclass
class TensorSlice:
    """What a rank reads of one stored tensor. dim/ranges None: all of it."""
    target: str                                    # the rank's parameter name (another expert index under EP)
    dim: int | None = None                         # 0: rows, 1: columns
    ranges: list[tuple[int, int]] | None = None    # [start, stop) in stored units, concatenated in order
    zero: bool = False                             # the rank's share is zeros (a row-parallel bias off rank 0)
    skip: bool = False                             # another rank's expert: not read here


def build_local_model(config: NemotronHConfig, layout: ParallelLayout, tp: TPGroup | None):
    """One rank's NemotronHForCausalLM, to be built under `torch.device("meta")` (no weights yet)."""
    from nemoh.models.linear import Linear
    from nemoh.models.nemotron_h import NemotronHForCausalLM

    model = NemotronHForCausalLM(layout.local_config(config))
    if not layout.is_parallel:
        return model
    start, _, rows = layout.vocab(config.vocab_size)
    model.backbone.embeddings = VocabParallelEmbedding(rows, config.hidden_size, start, tp)
    model.lm_head = Linear(config.hidden_size, rows, bias=False)
    model.tp = tp
    layers = list(model.backbone.layers) + (list(model.mtp.layers) if model.mtp is not None else [])
    for layer in layers:
        layer.tp = tp
    model.layout = layout
    return model


def keep_local_experts(model: nn.Module, config: NemotronHConfig, layout: ParallelLayout) -> None:
    """Expert parallel: every LatentMoE keeps experts [start, stop) only (the rest were never allocated)."""
    from nemoh.models.moe import LatentMoE

    if not (layout.is_parallel and layout.expert_parallel):
        return
    start, stop = layout.experts(config)
    for module in model.modules():
        if isinstance(module, LatentMoE):
            module.experts = nn.ModuleList(list(module.experts)[start:stop])
            module.num_experts = stop - start
            module.expert_range = (start, stop)


def _layer_type(config: NemotronHConfig, root: str, index: int) -> str | None:
    types = config.layer_types if root == "backbone" else config.mtp_layer_types
    return types[index] if 0 <= index < len(types) else None


def tensor_slice(name: str, shape: list[int], config: NemotronHConfig, layout: ParallelLayout) -> TensorSlice:
    """The part of checkpoint tensor `name` (stored `shape`) that this rank reads, by the rule of its layer kind."""
    if not layout.is_parallel:
        return TensorSlice(name)
    out = _rule(name, shape, config, layout)
    if len(shape) == 0 or (len(shape) == 1 and shape[0] == 1 and not name.endswith("bias")):
        out.dim = out.ranges = None                     # a per-tensor scale: every rank reads it whole
    return out


def _rule(name: str, shape: list[int], config: NemotronHConfig, layout: ParallelLayout) -> TensorSlice:
    whole = TensorSlice(name)
    if name in ("backbone.embeddings.weight", "lm_head.weight"):
        start, stop, _ = layout.vocab(config.vocab_size)
        return TensorSlice(name, 0, [(start, stop)])
    m = LAYER_RE.match(name)
    if m is None:
        return whole                                   # norms, norm_f, the MTP's enorm / hnorm / eh_proj
    root, index, rest = m.group(1), int(m.group(2)), m.group(3)
    kind = _layer_type(config, root, index)
    module, _, tensor = rest.rpartition(".")

    def rows(*ranges: tuple[int, int]) -> TensorSlice:
        return TensorSlice(name, 0, list(ranges))

    def cols(start: int, stop: int, width: int) -> TensorSlice:
        """Input features [start, stop) of a layer `width` wide; a bias of such a layer is added once."""
        if tensor == "bias":
            return TensorSlice(name, zero=layout.rank != 0)
        if len(shape) < 2:
            return whole                                # a per-tensor scale
        scale = shape[1] / width                       # 1, 1/2 (NVFP4 codes), 1/16 (NVFP4 block scales)
        return TensorSlice(name, 1, [(int(start * scale), int(stop * scale))])

    if kind == "attention":
        hd = config.head_dim
        q0, q1 = layout.split(config.num_attention_heads)
        if module == "q_proj":
            return rows((q0 * hd, q1 * hd))
        if module in ("k_proj", "v_proj"):
            k0, k1 = layout.kv_heads(config)
            return rows((k0 * hd, k1 * hd))
        if module == "o_proj":
            return cols(q0 * hd, q1 * hd, config.num_attention_heads * hd)
        return whole
    if kind == "mamba":
        p, n, d = config.mamba_head_dim, config.ssm_state_size, config.mamba_d_inner
        h0, h1 = layout.split(config.mamba_num_heads)
        g0, g1 = layout.split(config.n_groups)
        gn = config.n_groups * n
        x = (h0 * p, h1 * p)
        b, c = (g0 * n, g1 * n), (gn + g0 * n, gn + g1 * n)

        def shift(r: tuple[int, int], by: int) -> tuple[int, int]:
            return r[0] + by, r[1] + by

        if module == "in_proj":                         # [z | x B C | dt]
            return rows(x, shift(x, d), shift(b, 2 * d), shift(c, 2 * d), (2 * d + 2 * gn + h0, 2 * d + 2 * gn + h1))
        if module == "conv1d":                          # [x B C]
            return rows(x, shift(b, d), shift(c, d))
        if rest in ("dt_bias", "A_log", "D"):
            return rows((h0, h1))
        if module == "norm":
            return rows(x)
        if module == "out_proj":
            return cols(x[0], x[1], d)
        return whole
    if kind == "mlp":
        i0, i1 = layout.split(config.intermediate_size)
        if module == "up_proj":
            return rows((i0, i1))
        if module == "down_proj":
            return cols(i0, i1, config.intermediate_size)
        return whole
    if kind == "moe":
        if module == "shared_experts.up_proj":
            return rows(layout.split(config.moe_shared_expert_intermediate_size))
        if module == "shared_experts.down_proj":
            return cols(*layout.split(config.moe_shared_expert_intermediate_size),
                        config.moe_shared_expert_intermediate_size)
        if module == "fc2_latent_proj" and tensor == "bias":
            return TensorSlice(name, zero=layout.rank != 0)       # its input is this rank's partial sum
        e = EXPERT_RE.match(rest)
        if e is None:
            return whole                                 # the router and the latent projections: every rank
        j, leaf = int(e.group(1)), e.group(2)
        if layout.expert_parallel:
            start, stop = layout.experts(config)
            if not start <= j < stop:
                return TensorSlice(name, skip=True)
            return TensorSlice(name.replace(f"experts.{j}.", f"experts.{j - start}.", 1))
        i0, i1 = layout.split(config.moe_intermediate_size)
        if leaf.startswith("up_proj."):
            return rows((i0, i1))
        if leaf.startswith("down_proj."):
            return cols(i0, i1, config.moe_intermediate_size)
    return whole

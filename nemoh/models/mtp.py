"""The Multi-Token Prediction block (REFERENCE §1, MTP), as in Nemotron 3 Super ("*E").

One step: h' = eh_proj(cat(enorm(embed(token)), hnorm(h))), then the block's layers (pre-norm residual each),
then final_layernorm. The embedding and lm_head are the main model's. The step is applied repeatedly with
the same weights: its output feeds the next step together with the token it predicted.
"""
from __future__ import annotations

import torch
from torch import nn

from nemoh.config import NemotronHConfig
from nemoh.models.forward_context import ForwardContext
from nemoh.models.linear import Linear
from nemoh.models.norm import RMSNorm


def make_mixer(layer_type: str, config: NemotronHConfig, layer_idx: int) -> nn.Module:
    from nemoh.models.attention import Attention
    from nemoh.models.mamba2 import Mamba2Mixer
    from nemoh.models.mlp import MLP
    from nemoh.models.moe import LatentMoE

    if layer_type == "mamba":
        return Mamba2Mixer(config, layer_idx)
    if layer_type == "attention":
        return Attention(config, layer_idx)
    if layer_type == "moe":
        return LatentMoE(config, layer_idx)
    return MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)


CACHED_TYPES = ("mamba", "attention")


def run_mixer(layer_type: str, mixer: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """Only the mixers that keep per-sequence caches (Mamba, attention) take the forward context."""
    return mixer(x, ctx) if layer_type in CACHED_TYPES else mixer(x)


def run_layers(layers, x: torch.Tensor, ctx: ForwardContext, rows: list[int] | None) -> torch.Tensor:
    """Pre-norm residual layers (each with `.layer_type`, `.norm`, `.mixer`) over x (num_tokens, hidden).

    With `rows`, returns only those rows: every position still runs the layers that keep a cache (their KV /
    state must stay complete), and the layers after the last of them run on `rows` alone: a prompt chunk
    that samples nothing skips them, one that samples runs them on its last position only."""
    last_cached = len(layers)
    if rows is not None:
        last_cached = max((j for j, layer in enumerate(layers) if layer.layer_type in CACHED_TYPES), default=-1)
        if last_cached < 0:
            x = x[rows]
    for j, layer in enumerate(layers):
        out = run_mixer(layer.layer_type, layer.mixer, layer.norm(x), ctx)
        if layer.tp is not None:        # tensor parallel: each rank's mixer gave a partial sum
            out = layer.tp.all_reduce(out)
        x = x + out
        if j == last_cached:
            x = x[rows]
            if not rows:          # the caches are filled and no position is wanted
                break
    return x


def run_layers_step(layers, x: torch.Tensor, ctx) -> torch.Tensor:
    """`run_layers` for a uniform step (nemoh.models.forward_context.StepContext): every row through every
    layer with each mixer's graph-safe `forward_step`."""
    for layer in layers:
        mixer, h = layer.mixer, layer.norm(x)
        if layer.layer_type in CACHED_TYPES:
            out = mixer.forward_step(h, ctx)
        elif layer.layer_type == "moe":
            out = mixer.forward_step(h)
        else:
            out = mixer(h)
        x = x + (out if layer.tp is None else layer.tp.all_reduce(out))
    return x


class MTPLayer(nn.Module):
    tp = None           # the TPGroup that sums the mixer's partial output (nemoh.distributed); None on one rank

    def __init__(self, config: NemotronHConfig, layer_type: str, cache_idx: int, is_first: bool, is_last: bool):
        super().__init__()
        self.layer_type = layer_type
        eps = config.layer_norm_epsilon
        if is_first:
            self.enorm = RMSNorm(config.hidden_size, eps)
            self.hnorm = RMSNorm(config.hidden_size, eps)
            self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.norm = RMSNorm(config.hidden_size, eps)
        self.mixer = make_mixer(layer_type, config, cache_idx)
        if is_last:
            self.final_layernorm = RMSNorm(config.hidden_size, eps)


class MTPBlock(nn.Module):
    def __init__(self, config: NemotronHConfig):
        super().__init__()
        if config.num_nextn_predict_layers != 1:
            raise ValueError(f"config key 'num_nextn_predict_layers': nemoh supports exactly one MTP block "
                             f"(applied repeatedly), got {config.num_nextn_predict_layers}")
        types = config.mtp_layer_types
        base = config.num_hidden_layers
        self.layers = nn.ModuleList(
            MTPLayer(config, t, base + j, is_first=j == 0, is_last=j == len(types) - 1) for j, t in enumerate(types))

    def forward(self, token_embeds: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext,
                rows: list[int] | None = None) -> torch.Tensor:
        """token_embeds, hidden: (num_tokens, hidden) -> MTP hidden after final_layernorm, (num_tokens, hidden),
        or (len(rows), hidden) for just those rows (`run_layers`): for "*E" the MoE then runs only for the
        positions whose draft is wanted (the last of a prompt or of a verification's accepted tokens)."""
        first = self.layers[0]
        x = first.eh_proj(torch.cat([first.enorm(token_embeds), first.hnorm(hidden)], dim=-1))
        return self.layers[-1].final_layernorm(run_layers(self.layers, x, ctx, rows))

    def forward_step(self, token_embeds: torch.Tensor, hidden: torch.Tensor, ctx) -> torch.Tensor:
        """`forward` for a uniform step (graph-safe), every row."""
        first = self.layers[0]
        x = first.eh_proj(torch.cat([first.enorm(token_embeds), first.hnorm(hidden)], dim=-1))
        return self.layers[-1].final_layernorm(run_layers_step(self.layers, x, ctx))

"""The NemotronH causal LM: embeddings -> hybrid layers (pre-norm residual) -> norm_f -> lm_head, plus MTP.

Entry points:
- `model(input_ids)`: input_ids (B, T) -> logits (B, T, vocab); a full causal forward with no cache.
- `model.forward_hidden(input_ids, ctx, rows=None)`: flat input_ids (num_tokens,) -> hidden after norm_f
  (num_tokens, hidden), reading and writing the caches registered in `ctx` (the engine's path); with
  `rows`, only those rows' hidden (the layers after the last cache-keeping one run on them alone).
- `model.compute_logits(hidden)`: (n, hidden) -> (n, vocab) float32.
- `model.mtp_forward(input_ids, hidden, ctx, rows=None)`: one MTP step per position (see nemoh.models.mtp);
  with `rows`, the output of those positions only.
"""
from __future__ import annotations

import torch
from torch import nn

from nemoh.config import NemotronHConfig
from nemoh.models.forward_context import ForwardContext
from nemoh.models.linear import Linear
from nemoh.models.mtp import MTPBlock, make_mixer, run_layers, run_layers_step
from nemoh.models.norm import RMSNorm


class Block(nn.Module):
    """One pre-norm residual layer: x + mixer(norm(x)), run by `run_layers`."""

    tp = None           # the TPGroup that sums the mixer's partial output (nemoh.distributed); None on one rank

    def __init__(self, config: NemotronHConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = make_mixer(self.layer_type, config, layer_idx)


def make_embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """`nn.Embedding`, without its `normal_` initialisation when it is built on the meta device (the loader's
    and the memory plan's models): there torch runs that init through its Python references, whose first use
    imports torch._dynamo, sympy and triton, about 150 MiB of resident memory that nothing else needs."""
    weight = torch.empty(num_embeddings, embedding_dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(num_embeddings, embedding_dim, _weight=weight)


class Backbone(nn.Module):
    def __init__(self, config: NemotronHConfig):
        super().__init__()
        self.embeddings = make_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext, rows: list[int] | None = None) -> torch.Tensor:
        return self.norm_f(run_layers(self.layers, self.embeddings(input_ids), ctx, rows))


class NemotronHForCausalLM(nn.Module):
    tp = None           # tensor parallel (nemoh.distributed): lm_head holds a vocabulary slice, logits are gathered

    def __init__(self, config: NemotronHConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = MTPBlock(config) if config.has_mtp else None
        # FP8 KV-cache scales found in the checkpoint (k_proj.k_scale / v_proj.v_scale), by layer index
        self.kv_scales: dict[int, tuple[float, float]] = {}

    def tie_weights(self) -> None:
        """Share the embedding matrix as the head (the loader calls it for a tied checkpoint without a head)."""
        self.lm_head.weight = self.backbone.embeddings.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.embeddings.weight.device

    def forward_hidden(self, input_ids: torch.Tensor, ctx: ForwardContext,
                       rows: list[int] | None = None) -> torch.Tensor:
        return self.backbone(input_ids, ctx, rows)

    def forward_step(self, input_ids: torch.Tensor, ctx) -> torch.Tensor:
        """The graph-safe forward of a uniform step (nemoh.models.forward_context.StepContext): flat input_ids
        (num_seqs * q,) -> hidden after norm_f (num_seqs * q, hidden); static shapes, no host synchronisation."""
        backbone = self.backbone
        return backbone.norm_f(run_layers_step(backbone.layers, backbone.embeddings(input_ids), ctx))

    def mtp_forward_step(self, input_ids: torch.Tensor, hidden: torch.Tensor, ctx) -> torch.Tensor:
        """The MTP block over a uniform step's rows (graph-safe): (n,), (n, hidden) -> (n, hidden)."""
        return self.mtp.forward_step(self.backbone.embeddings(input_ids), hidden, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        return logits if self.tp is None else self.tp.gather_vocab(logits)

    def mtp_forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext,
                    rows: list[int] | None = None) -> torch.Tensor:
        if self.mtp is None:
            raise RuntimeError("this checkpoint has no MTP block (num_nextn_predict_layers is 0)")
        return self.mtp(self.backbone.embeddings(input_ids), hidden, ctx, rows)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, T) -> logits (B, T, vocab) float32, a full causal forward without cache."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        ctx = ForwardContext.for_full_forward(b, t)
        hidden = self.forward_hidden(input_ids.reshape(-1).to(self.device), ctx)
        return self.compute_logits(hidden).view(b, t, -1)

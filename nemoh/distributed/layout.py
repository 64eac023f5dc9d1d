"""Which part of every layer a rank holds, and whether a model fits a parallel size at all.

`ParallelLayout(world_size, rank, expert_parallel)` is pure arithmetic on the config: no process group, no
weights. It answers, for rank r of N:
  attention   query heads [r*H/N, (r+1)*H/N); KV heads [r*KV/N, ...) or, with fewer KV heads than ranks, the one KV
              head its query heads read (replicated on N/KV ranks)
  Mamba-2     heads [r*MH/N, ...) with their groups [r*G/N, ...): heads share B and C within a group, so a rank's
              heads and groups must line up (G divisible by N); the gated norm's groups then stay whole
  MLP, shared expert, routed experts (tensor parallel): intermediate rows [r*I/N, ...)
  routed experts (expert parallel): experts [r*E/N, ...) whole
  embeddings / lm_head: vocabulary rows [r*ceil(V/N), ...), the last rank's padded with zero rows
Quantized weights are split on their blocks: an NVFP4 row-parallel input slice must hold whole 16-input blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from nemoh.config import NemotronHConfig

TP_FLAG = "--tensor-parallel-size"
EP_FLAG = "--enable-expert-parallel"


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int = 1
    rank: int = 0
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"{TP_FLAG}: must be a positive integer, got {self.world_size!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside the world of {self.world_size}")

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    # ---- checks -------------------------------------------------------------------------------------------
    def check(self, config: NemotronHConfig, quant_algo: str | None = None) -> None:
        """Raise ValueError (one line, naming the flag) when the model's sizes do not split over world_size."""
        n = self.world_size
        if n == 1:
            return

        def bad(what: str) -> None:
            raise ValueError(f"{TP_FLAG} {n}: {what}")

        types = set(config.layer_types) | (set(config.mtp_layer_types) if config.has_mtp else set())
        if "attention" in types:
            if config.num_attention_heads % n:
                bad(f"num_attention_heads {config.num_attention_heads} is not divisible by {n}")
            kv = config.num_key_value_heads
            if kv % n and n % kv:
                bad(f"num_key_value_heads {kv} neither divides nor is divisible by {n}")
        if "mamba" in types:
            if config.mamba_num_heads % n:
                bad(f"mamba_num_heads {config.mamba_num_heads} is not divisible by {n}")
            if config.n_groups % n:
                bad(f"Mamba n_groups {config.n_groups} is not divisible by {n} (heads share B and C per group)")
        if "mlp" in types and config.intermediate_size % n:
            bad(f"intermediate_size {config.intermediate_size} is not divisible by {n}")
        if "moe" in types:
            if config.moe_shared_expert_intermediate_size % n:
                bad(f"moe_shared_expert_intermediate_size {config.moe_shared_expert_intermediate_size} is not "
                    f"divisible by {n}")
            if self.expert_parallel:
                if config.n_routed_experts % n:
                    raise ValueError(f"{EP_FLAG}: n_routed_experts {config.n_routed_experts} is not divisible by "
                                     f"{TP_FLAG} {n}")
            elif config.moe_intermediate_size % n:
                bad(f"moe_intermediate_size {config.moe_intermediate_size} is not divisible by {n} "
                    f"(or pass {EP_FLAG})")
        if quant_algo is not None and "NVFP4" in quant_algo.upper():
            block = 16
            widths = {"attention o_proj input": config.num_attention_heads * config.head_dim,
                      "Mamba out_proj input": config.mamba_d_inner, "MLP down_proj input": config.intermediate_size,
                      "shared expert down_proj input": config.moe_shared_expert_intermediate_size}
            if not self.expert_parallel:
                widths["expert down_proj input"] = config.moe_intermediate_size
            for what, width in widths.items():
                if width // n % block:
                    bad(f"the {what} ({width}) split {n} ways is not a whole number of NVFP4 blocks of {block}")

    # ---- the per-rank config --------------------------------------------------------------------------------
    def local_config(self, config: NemotronHConfig) -> NemotronHConfig:
        """The config of the layers a rank builds: local heads, groups and widths. vocab_size, hidden_size and
        n_routed_experts stay global (the router scores every expert; the vocabulary split is the embedding's)."""
        n = self.world_size
        if n == 1:
            return config
        kv = config.num_key_value_heads
        return replace(
            config,
            num_attention_heads=config.num_attention_heads // n,
            num_key_value_heads=max(1, kv // n),
            mamba_num_heads=config.mamba_num_heads // n,
            n_groups=config.n_groups // n,
            intermediate_size=config.intermediate_size // n,
            moe_shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size // n,
            moe_intermediate_size=(config.moe_intermediate_size if self.expert_parallel
                                   else config.moe_intermediate_size // n),
        )

    # ---- ranges ---------------------------------------------------------------------------------------------
    def split(self, total: int) -> tuple[int, int]:
        """[start, stop) of an evenly divisible `total`."""
        per = total // self.world_size
        return self.rank * per, (self.rank + 1) * per

    def kv_heads(self, config: NemotronHConfig) -> tuple[int, int]:
        kv, n = config.num_key_value_heads, self.world_size
        if kv >= n:
            return self.split(kv)
        head = self.rank * kv // n          # the KV head that this rank's query heads are grouped with
        return head, head + 1

    def vocab(self, vocab_size: int) -> tuple[int, int, int]:
        """(start, stop, rows per rank): rows per rank is ceil(V/N); stop - start may be fewer (the last rank)."""
        per = -(-vocab_size // self.world_size)
        start = min(self.rank * per, vocab_size)
        return start, min(start + per, vocab_size), per

    def experts(self, config: NemotronHConfig) -> tuple[int, int]:
        return self.split(config.n_routed_experts) if self.expert_parallel else (0, config.n_routed_experts)

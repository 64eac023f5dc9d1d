"""NemotronHConfig: the model's shape, read from a Hugging Face `config.json` with every key variant in use.

Layer types may come as `hybrid_override_pattern` ("M-*E" characters) or `layers_block_type` (a list using
either vocabulary: mamba/attention/moe/mlp or linear_attention/full_attention/moe/mlp). Legacy `mamba_*`
aliases are accepted. Internally layer types are always "mamba", "attention", "moe" or "mlp".
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields

PATTERN_CHARS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
TYPE_ALIASES = {
    "mamba": "mamba", "linear_attention": "mamba", "M": "mamba",
    "attention": "attention", "full_attention": "attention", "*": "attention",
    "moe": "moe", "E": "moe",
    "mlp": "mlp", "-": "mlp",
}
LEGACY_ALIASES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_chunk_size": "chunk_size",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_d_state": "ssm_state_size",
    "mamba_headdim": "mamba_head_dim",
    "mamba_nheads": "mamba_num_heads",
    "num_local_experts": "n_routed_experts",
}
SUPPORTED_MODEL_TYPES = {"nemotron_h", "nemotron_h_mtp"}
REQUIRED_KEYS = ("vocab_size", "hidden_size")
SSM_CACHE_DTYPES = ("float32", "float16", "bfloat16")


def _float(value, key: str) -> float:
    """Accept numbers, "inf"/"Infinity" strings and transformers' {"__float__": "Infinity"} encoding."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {key!r}: expected a number, got {value!r}") from None


def parse_layer_types(value, key: str) -> list[str]:
    if isinstance(value, str):
        items = list(value)
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"config key {key!r}: expected a pattern string or a list of layer types, got {value!r}")
    out = []
    for i, item in enumerate(items):
        if item not in TYPE_ALIASES:
            raise ValueError(
                f"config key {key!r}: unknown layer type {item!r} at position {i} "
                f"(pattern characters are M, *, E, -; list names are mamba/linear_attention, "
                f"attention/full_attention, moe, mlp)"
            )
        out.append(TYPE_ALIASES[item])
    return out


@dataclass
class NemotronHConfig:
    vocab_size: int
    hidden_size: int
    layer_types: list[str]
    model_type: str = "nemotron_h"
    tie_word_embeddings: bool = False
    layer_norm_epsilon: float = 1e-5
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: list[int] = field(default_factory=lambda: [2])
    pad_token_id: int | None = 0
    torch_dtype: str | None = None
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    attention_bias: bool = False
    # dense MLP
    intermediate_size: int = 21504
    mlp_bias: bool = False
    mlp_hidden_act: str = "relu2"
    # Mamba-2
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    expand: int = 2
    chunk_size: int = 128
    use_conv_bias: bool = True
    use_bias: bool = False
    mamba_hidden_act: str = "silu"
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    mamba_ssm_cache_dtype: str = "float32"
    # LatentMoE
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # MTP
    num_nextn_predict_layers: int = 0
    mtp_layer_types: list[str] = field(default_factory=lambda: ["attention", "moe"])
    # quantization block as found in config.json (parsed by nemoh.quant)
    quantization_config: dict | None = None

    def __post_init__(self) -> None:
        self._validate()

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def hybrid_override_pattern(self) -> str:
        inverse = {v: k for k, v in PATTERN_CHARS.items()}
        return "".join(inverse[t] for t in self.layer_types)

    @property
    def attention_layer_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "attention"]

    @property
    def mamba_layer_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "mamba"]

    @property
    def has_mtp(self) -> bool:
        return self.num_nextn_predict_layers > 0

    @property
    def mtp_attention_layer_ids(self) -> list[int]:
        """Cache indices of the MTP block's attention layers: they follow the main layers."""
        if not self.has_mtp:
            return []
        return [self.num_hidden_layers + j for j, t in enumerate(self.mtp_layer_types) if t == "attention"]

    # ---- validation -----------------------------------------------------------------------------
    def _validate(self) -> None:
        def bad(key: str, why: str) -> None:
            raise ValueError(f"config key {key!r}: {why}")

        if self.model_type not in SUPPORTED_MODEL_TYPES:
            bad("model_type", f"unsupported model type {self.model_type!r} (nemoh runs {sorted(SUPPORTED_MODEL_TYPES)})")
        for key in ("vocab_size", "hidden_size", "num_attention_heads", "mamba_num_heads", "mamba_head_dim",
                    "ssm_state_size", "n_groups", "conv_kernel", "chunk_size", "n_routed_experts",
                    "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(key, f"must be a positive integer, got {value!r}")
        if not self.layer_types:
            bad("hybrid_override_pattern", "the model has no layers")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                bad("num_attention_heads", f"{self.num_attention_heads} does not divide hidden_size {self.hidden_size}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads",
                f"{self.num_key_value_heads} does not divide num_attention_heads {self.num_attention_heads}")
        if self.mamba_num_heads % self.n_groups:
            bad("n_groups", f"{self.n_groups} does not divide mamba_num_heads {self.mamba_num_heads}")
        if "moe" in self.layer_types or (self.has_mtp and "moe" in self.mtp_layer_types):
            if self.n_routed_experts % self.n_group:
                bad("n_group", f"{self.n_group} does not divide n_routed_experts {self.n_routed_experts}")
            if self.topk_group > self.n_group:
                bad("topk_group", f"{self.topk_group} exceeds n_group {self.n_group}")
            if self.num_experts_per_tok > self.n_routed_experts:
                bad("num_experts_per_tok", f"{self.num_experts_per_tok} exceeds n_routed_experts {self.n_routed_experts}")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1 and per_group < 2:
                bad("n_group", "group-limited routing needs at least 2 experts per group")
            if self.num_experts_per_tok > self.topk_group * per_group:
                bad("num_experts_per_tok",
                    f"{self.num_experts_per_tok} exceeds the experts in the kept groups ({self.topk_group}x{per_group})")
        if self.mlp_hidden_act != "relu2":
            bad("mlp_hidden_act", f"only relu2 is supported, got {self.mlp_hidden_act!r}")
        if self.mamba_hidden_act != "silu":
            bad("mamba_hidden_act", f"only silu is supported, got {self.mamba_hidden_act!r}")
        if self.mamba_ssm_cache_dtype not in SSM_CACHE_DTYPES:
            bad("mamba_ssm_cache_dtype", f"must be one of {SSM_CACHE_DTYPES}, got {self.mamba_ssm_cache_dtype!r}")
        lo, hi = self.time_step_limit
        if not lo <= hi:
            bad("time_step_limit", f"lower bound {lo} exceeds upper bound {hi}")
        if self.num_nextn_predict_layers < 0:
            bad("num_nextn_predict_layers", "must be >= 0")
        if self.has_mtp and any(t not in ("attention", "moe", "mlp") for t in self.mtp_layer_types):
            bad("mtp_hybrid_override_pattern", "the MTP block may only hold attention, moe and mlp layers")

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict) -> "NemotronHConfig":
        if not isinstance(raw, dict):
            raise ValueError(f"config must be a JSON object, got {type(raw).__name__}")
        d = dict(raw)
        for old, new in LEGACY_ALIASES.items():
            if old in d:
                d[new] = d.pop(old)  # the legacy name wins, as in transformers
        # The model type first: another model's config (a Llama's) is "not a NemotronH checkpoint", not a
        # NemotronH config that lacks a key.
        if "model_type" not in d:
            raise ValueError("config key 'model_type': missing (required; expected 'nemotron_h')")
        if d["model_type"] not in SUPPORTED_MODEL_TYPES:
            arch = f", architectures {d['architectures']}" if d.get("architectures") else ""
            raise ValueError(f"not a NemotronH checkpoint (model_type {d['model_type']!r}{arch}); nemoh runs "
                             f"model_type {' or '.join(sorted(SUPPORTED_MODEL_TYPES))} only")
        for key in REQUIRED_KEYS:
            if key not in d:
                raise ValueError(f"config key {key!r}: missing (required)")
        if "layers_block_type" in d and d["layers_block_type"] is not None:
            layer_types = parse_layer_types(d.pop("layers_block_type"), "layers_block_type")
            d.pop("hybrid_override_pattern", None)
        elif "hybrid_override_pattern" in d:
            layer_types = parse_layer_types(d.pop("hybrid_override_pattern"), "hybrid_override_pattern")
        elif "layer_types" in d:
            layer_types = parse_layer_types(d.pop("layer_types"), "layer_types")
        else:
            raise ValueError("config key 'hybrid_override_pattern': missing (or 'layers_block_type'); "
                             "the layer types are required")
        num_layers = d.pop("num_hidden_layers", None)
        if num_layers is not None and num_layers != len(layer_types):
            raise ValueError(f"config key 'num_hidden_layers': {num_layers} does not match the "
                             f"{len(layer_types)} layer types given")
        mtp = None
        for key in ("mtp_layers_block_type", "mtp_hybrid_override_pattern"):
            if d.get(key) is not None:
                mtp = parse_layer_types(d[key], key)
                break
        for key in ("mtp_layers_block_type", "mtp_hybrid_override_pattern"):
            d.pop(key, None)
        if mtp is not None:
            d["mtp_layer_types"] = mtp
        if "time_step_limit" in d:
            lim = d["time_step_limit"]
            if not isinstance(lim, (list, tuple)) or len(lim) != 2:
                raise ValueError(f"config key 'time_step_limit': expected [low, high], got {lim!r}")
            d["time_step_limit"] = (_float(lim[0], "time_step_limit"), _float(lim[1], "time_step_limit"))
        for key in ("time_step_min", "time_step_max", "time_step_floor", "routed_scaling_factor",
                    "layer_norm_epsilon"):
            if key in d:
                d[key] = _float(d[key], key)
        eos = d.get("eos_token_id", [2])
        d["eos_token_id"] = [eos] if isinstance(eos, int) else list(eos or [])
        if "torch_dtype" not in d and "dtype" in d:
            d["torch_dtype"] = d["dtype"]
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["layer_types"] = layer_types
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "NemotronHConfig":
        path = os.path.join(os.fspath(model_dir), "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing config.json (is {model_dir!s} a Hugging Face model directory?)")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(raw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        """A config.json that both nemoh and transformers read."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "layer_types":
                out["hybrid_override_pattern"] = self.hybrid_override_pattern
            elif f.name == "mtp_layer_types":
                inverse = {v: k for k, v in PATTERN_CHARS.items()}
                out["mtp_hybrid_override_pattern"] = "".join(inverse[t] for t in value)
            elif f.name == "time_step_limit":
                out[f.name] = list(value)
            elif f.name == "quantization_config" and value is None:
                continue
            else:
                out[f.name] = value
        out["num_hidden_layers"] = self.num_hidden_layers
        out["architectures"] = ["NemotronHForCausalLM"]
        return out

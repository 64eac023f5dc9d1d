"""The memory plan: what a model needs on one device, item by item, and how many sequences of what length fit.

Computed from the config alone (the model is built on the meta device, the checkpoint's quantization applied to
it, no weight read), so `nemoh plan` can print it for a 120B checkpoint that is not on the machine and the server
can refuse an impossible start before it loads anything. Per device (tensor parallelism divides what it shards):

  resident   weights by kind in the checkpoint's formats; on a CPU the native kernels' panel copies (one re-laid
             copy of each bfloat16 / float16 / quantized Linear weight) or oneDNN's packed float32 copies
  transient  the peak of one step at the largest admitted shapes: a prefill chunk of max_num_batched_tokens, and
             a verification of max_num_seqs x (1 + k) rows whose per-position Mamba states are kept in every
             layer until the roll-back (`verify_states`); the score tiles of the tiled attention; stacking one
             projection of one MoE layer's experts into one tensor on first use (GPU kernels, graph-safe step)
  caches     what is left: one Mamba state slot per running sequence (max_num_seqs), then KV blocks

Activation estimates are upper bounds by layer kind (the formulas below), checked against the peak measured
tensor by tensor (nemoh.engine.memory_profile) on small models in tests/engine/test_memory_plan.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nemoh.config import NemotronHConfig
from nemoh.kernels.paged_attention import KEY_TILE, QUERY_TILE

GiB = 1024 ** 3
KINDS = ("routed experts", "shared experts", "MoE router + latent", "Mamba", "attention", "dense MLP",
         "embeddings + head", "norms", "MTP")


def tensor_dtype(module: nn.Module, tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter or buffer is loaded in (nemoh.loader): integer and fp8 tensors as stored, float32
    for modules that keep it (the router), else the model dtype."""
    if not tensor.is_floating_point() or tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return tensor.dtype
    return torch.float32 if getattr(module, "keep_fp32", False) else dtype


def weight_kind(name: str, config: NemotronHConfig) -> str:
    """Which KINDS entry a parameter of the model belongs to, from its name."""
    if name.startswith("mtp."):
        return "MTP"
    if name.startswith("backbone.embeddings") or name.startswith("lm_head"):
        return "embeddings + head"
    if ".experts." in name:
        return "routed experts"
    if ".shared_experts." in name:
        return "shared experts"
    parts = name.split(".")
    if name.startswith("backbone.layers.") and parts[3] == "mixer":
        kind = config.layer_types[int(parts[2])]
        return {"mamba": "Mamba", "attention": "attention", "mlp": "dense MLP", "moe": "MoE router + latent"}[kind]
    return "norms"


def model_tensors(config: NemotronHConfig, quant_config=None):
    """(name, module, tensor name, tensor) of every parameter and buffer of the model as nemoh.loader builds it,
    on the meta device, without building all of it: one layer of each type is built and walked once per layer
    of that type, and each Linear is swapped for its quantized module where the quantization config names it
    (a 120B model's 41k expert modules would take minutes to construct; this takes seconds)."""
    from nemoh.models.mtp import MTPBlock
    from nemoh.models.nemotron_h import Block, make_embedding
    from nemoh.models.linear import Linear
    from nemoh.models.norm import RMSNorm
    from nemoh.quant.linear import QUANT_LINEAR_CLASSES

    quantized: dict[tuple, nn.Module] = {}

    def walk(prefix: str, root: nn.Module):
        for mod_name, module in root.named_modules():
            full = f"{prefix}.{mod_name}" if mod_name else prefix
            scheme = quant_config.scheme_for(full) if quant_config is not None and isinstance(module, nn.Linear) \
                else None
            if scheme is not None:
                key = (scheme, module.in_features, module.out_features, quant_config.has_input_scale(full))
                if key not in quantized:
                    quantized[key] = QUANT_LINEAR_CLASSES[scheme](key[1], key[2], has_input_scale=key[3],
                                                                  device="meta")
                module = quantized[key]
            for tname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if t is not None:
                    yield full, module, tname, t

    with torch.device("meta"):
        templates = {t: Block(config, config.layer_types.index(t)) for t in set(config.layer_types)}
        yield from walk("backbone.embeddings", make_embedding(config.vocab_size, config.hidden_size))
        for i, layer_type in enumerate(config.layer_types):
            yield from walk(f"backbone.layers.{i}", templates[layer_type])
        yield from walk("backbone.norm_f", RMSNorm(config.hidden_size, config.layer_norm_epsilon))
        if not config.tie_word_embeddings:
            yield from walk("lm_head", Linear(config.hidden_size, config.vocab_size, bias=False))
        if config.has_mtp:
            yield from walk("mtp", MTPBlock(config))


@dataclass
class WeightCount:
    params: dict[str, int] = field(default_factory=dict)        # logical parameters by kind (packed: x2 per byte)
    bytes: dict[str, int] = field(default_factory=dict)         # resident bytes by kind
    formats: dict[str, set[str]] = field(default_factory=dict)  # stored formats by kind
    linear_bytes: int = 0           # bytes of every Linear weight (panel copies are made of these on a CPU)
    packable_fp32_bytes: int = 0    # float32 Linear weights oneDNN packs on a CPU
    largest_expert_stack: int = 0   # bytes of one tensor kind of one MoE layer's experts, stacked

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def loaded_tensors(model: nn.Module):
    """model_tensors' tuples for a model already built (each shared tensor once)."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for tname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                yield mod_name, module, tname, t


def count_weights(tensors, config: NemotronHConfig, dtype: torch.dtype) -> WeightCount:
    """Parameters and resident bytes by kind of `tensors` (model_tensors or loaded_tensors)."""
    from nemoh.models.linear import PACK_MIN_ELEMENTS

    count = WeightCount()
    stacks: dict[tuple[str, str], int] = {}
    for mod_name, module, tname, t in tensors:
        name = f"{mod_name}.{tname}" if mod_name else tname
        kind = weight_kind(name, config)
        dt = tensor_dtype(module, t, dtype)
        nbytes = t.numel() * dt.itemsize
        packed_codes = getattr(module, "scheme", None) == "nvfp4" and tname == "weight"
        if tname in ("weight", "bias") or not hasattr(module, "scheme"):
            count.params[kind] = count.params.get(kind, 0) + t.numel() * (2 if packed_codes else 1)
        count.bytes[kind] = count.bytes.get(kind, 0) + nbytes
        fmt = getattr(module, "scheme", None) or str(dt).removeprefix("torch.")
        if tname == "weight":
            count.formats.setdefault(kind, set()).add(fmt)
        if isinstance(module, nn.Linear) or hasattr(module, "scheme"):
            count.linear_bytes += nbytes
            if dt == torch.float32 and tname == "weight" and t.numel() >= PACK_MIN_ELEMENTS:
                count.packable_fp32_bytes += nbytes
        if ".experts." in name:
            layer, proj = name.split(".experts.")[0], name.rsplit(".", 2)[-2] + "." + tname
            stacks[(layer, proj)] = stacks.get((layer, proj), 0) + nbytes
    count.largest_expert_stack = max(stacks.values(), default=0)
    return count


def device_share(tensors, config: NemotronHConfig, dtype: torch.dtype, layout) -> int:
    """Bytes of `tensors` (the whole model's) that one rank of `layout` loads: the rows / columns its sharding rule
    reads (a padded vocabulary slice counts whole), nothing of another rank's experts, replicated tensors whole."""
    from nemoh.distributed.sharding import tensor_slice

    total = 0
    for mod_name, module, tname, t in tensors:
        name = f"{mod_name}.{tname}" if mod_name else tname
        nbytes = t.numel() * tensor_dtype(module, t, dtype).itemsize
        share = tensor_slice(name, list(t.shape), config, layout)
        if share.skip:
            continue
        if share.dim is not None:
            rows = layout.vocab(config.vocab_size)[2] if name in ("backbone.embeddings.weight", "lm_head.weight") \
                else sum(b - a for a, b in share.ranges)
            nbytes = nbytes * rows // t.shape[share.dim]
        total += nbytes
    return total


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def activation_bytes(config: NemotronHConfig, num_tokens: int, num_seqs: int, q_len: int, act_dtype: torch.dtype,
                     sampled_rows: int, tp: int = 1) -> dict[str, int]:
    """Upper bounds of what one forward step of `num_tokens` rows (`num_seqs` sequences of `q_len` new tokens
    each) holds at once, per layer kind: the largest of them is live at a time, on top of the residual stream.
    Heads and widths are divided by the tensor-parallel size where they are sharded."""
    c, T, a = config, num_tokens, _elem(act_dtype)
    f32 = 4
    hidden = c.hidden_size
    out: dict[str, int] = {"residual stream": 4 * T * hidden * a}
    if "mamba" in c.layer_types:
        H, P, N, G, cs = c.mamba_num_heads // tp, c.mamba_head_dim, c.ssm_state_size, c.n_groups // tp, c.chunk_size
        d_inner, conv_dim = H * P, H * P + 2 * G * N
        chunks = (T + cs - 1) // cs + num_seqs
        out["Mamba layer"] = (
            T * (2 * d_inner + 2 * G * N + H) * a * 2           # in_proj output, its split and gated copies
            + 3 * T * conv_dim * f32                            # depthwise conv in float32, SiLU, split
            + 2 * T * H * cs * f32                              # SSD: intra-chunk decay and scores
            + 3 * chunks * H * P * N * f32                      # SSD: per-chunk states, carried and decayed
            + 4 * T * d_inner * f32                             # y, D skip, gated norm in float32
            + 2 * T * H * N * G * f32 // max(1, G))             # B, C expanded per head
    if "moe" in c.layer_types or "moe" in c.mtp_layer_types:
        E, k, I = c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size // tp
        L = c.moe_latent_size or hidden
        out["MoE layer"] = (
            4 * T * E * f32                                     # router logits, sigmoid, choice, group mask
            + 2 * T * L * a + T * L * f32                       # latent input, the routed sum in float32
            + T * k * (2 * L * a + I * a + L * f32)             # (token, expert) pairs: inputs, hidden, outputs
            + 2 * T * c.moe_shared_expert_intermediate_size // tp * a)
    if "attention" in c.layer_types:
        H, KVH, D = max(1, c.num_attention_heads // tp), max(1, c.num_key_value_heads // tp), c.head_dim
        qt = min(QUERY_TILE, q_len)
        out["attention layer"] = (
            3 * T * (H + 2 * KVH) * D * a                       # q, k, v and their views made contiguous
            + 2 * T * H * D * f32                               # the output and its float32 accumulator
            + 3 * num_seqs * H * qt * KEY_TILE * f32            # one score tile, its exp, its mask
            + 4 * num_seqs * KEY_TILE * KVH * D * a)            # one tile of keys and values read from the cache
    if "mlp" in c.layer_types:
        out["MLP layer"] = 2 * T * c.intermediate_size // tp * a
    out["logits"] = 3 * sampled_rows * c.vocab_size * f32 // tp
    return out


@dataclass
class MemoryPlan:
    """The plan for one device; sizes in bytes. `fit(length)` answers how many sequences of a length fit."""
    config: NemotronHConfig
    device_bytes: int
    utilization: float
    tp: int
    weights: WeightCount
    weight_dtype: torch.dtype
    quant_algo: str | None
    kv_dtype: torch.dtype
    ssm_dtype: torch.dtype
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    num_speculative_tokens: int
    device_type: str
    resident: dict[str, int]
    transient: dict[str, int]
    kv_bytes_per_token: int
    mamba_bytes_per_seq: int
    # the engine's cache budget where it is not what the device holds less the rest (cache_memory_gb; a CPU's
    # cpu_memory_utilization share): set by engine_plan
    cache_budget: int | None = None
    # Mamba state snapshots kept for the prefix cache's resume points (nemoh.engine.prefix_cache): set by
    # engine_plan / `nemoh plan` with prefix caching on; they come out of the cache budget before sequences do
    prefix_snapshots: int = 0
    expert_parallel: bool = False
    # the peak transient memory the engine's start-up profiling step measured (nemoh.engine.memory_profile); when
    # set, it replaces the estimate `transient` in what the caches are sized from
    measured_transient: int | None = None
    measured_by: str | None = None

    @property
    def usable_bytes(self) -> int:
        return int(self.device_bytes * self.utilization)

    @property
    def resident_bytes(self) -> int:
        return sum(self.resident.values())

    @property
    def estimated_transient_bytes(self) -> int:
        return sum(self.transient.values())

    @property
    def transient_bytes(self) -> int:
        """The transients the caches are sized around: measured at start-up when profiled, else estimated."""
        if self.measured_transient is not None:
            return self.measured_transient
        return self.estimated_transient_bytes

    @property
    def cache_bytes(self) -> int:
        """What is left for KV blocks and Mamba slots (negative: not even the model fits)."""
        if self.cache_budget is not None:
            return self.cache_budget
        return self.usable_bytes - self.resident_bytes - self.transient_bytes

    @property
    def snapshot_bytes(self) -> int:
        return self.prefix_snapshots * self.mamba_bytes_per_seq

    @property
    def seq_cache_bytes(self) -> int:
        """What is left for running sequences' KV blocks and Mamba slots once the prefix snapshots are set aside."""
        return self.cache_bytes - self.snapshot_bytes

    def default_prefix_snapshots(self, num_slots: int | None = None) -> int:
        """Snapshots when not set: two per running slot, from the memory the sequences of max_model_len could
        never use, and at least an eighth of the budget where that is less (never more than it holds)."""
        if not self.mamba_bytes_per_seq or self.cache_bytes <= 0:
            return 0
        _, slots = self.cache_sizes(num_slots)
        spare = self.cache_bytes - slots * self.seq_bytes(self.max_model_len)
        wanted = min(2 * slots, max(spare, self.cache_bytes // 8) // self.mamba_bytes_per_seq)
        # never so many that one sequence of max_model_len stops fitting
        return int(max(0, min(wanted, (self.cache_bytes - self.seq_bytes(self.max_model_len))
                                      // self.mamba_bytes_per_seq)))

    def blocks_per_seq(self, length: int) -> int:
        """KV blocks a sequence of `length` tokens can use (MTP drafts run up to 2k + 1 past it)."""
        return (length + 2 * self.num_speculative_tokens + 1 + self.block_size - 1) // self.block_size

    def seq_bytes(self, length: int) -> int:
        """One sequence of `length` tokens: its KV blocks and its Mamba state slot."""
        return self.blocks_per_seq(length) * self.block_size * self.kv_bytes_per_token + self.mamba_bytes_per_seq

    def fit(self, length: int) -> int:
        """How many sequences of `length` tokens fit at once (0: not even one), at most max_num_seqs."""
        if self.seq_cache_bytes <= 0:
            return 0
        return min(self.max_num_seqs, self.seq_cache_bytes // self.seq_bytes(length))

    def max_len_for_one(self) -> int:
        """The longest sequence that fits alone (0: none)."""
        left = self.seq_cache_bytes - self.mamba_bytes_per_seq
        if left <= 0 or not self.kv_bytes_per_token:
            return 0 if left <= 0 else 1 << 62
        blocks = left // (self.block_size * self.kv_bytes_per_token)
        return max(0, blocks * self.block_size - 2 * self.num_speculative_tokens - 1)

    def cache_sizes(self, num_slots: int | None = None) -> tuple[int, int]:
        """(KV blocks, Mamba slots) the engine allocates from `cache_bytes`: a slot per sequence up to
        max_num_seqs (fewer when half the budget cannot hold them), the rest in blocks, capped at what the
        slots' sequences (and the prefix snapshots' prefixes) of max_model_len tokens could use."""
        budget = max(0, self.seq_cache_bytes)
        slots = num_slots if num_slots is not None else self.max_num_seqs
        if num_slots is None and self.mamba_bytes_per_seq and slots * self.mamba_bytes_per_seq > budget // 2:
            slots = max(1, (budget // 2) // self.mamba_bytes_per_seq)
        per_block = self.block_size * self.kv_bytes_per_token
        useful = (slots + self.prefix_snapshots) * self.blocks_per_seq(self.max_model_len)
        left = budget - slots * self.mamba_bytes_per_seq
        blocks = min(useful, max(0, left) // per_block) if per_block else useful
        return blocks, slots

    def check_fits(self) -> None:
        """ValueError naming what does fit when not even one sequence of max_model_len fits."""
        if self.cache_bytes <= 0 and self.cache_budget is None:
            raise ValueError(
                f"the model does not fit: {self.usable_bytes / GiB:.2f} GiB usable, weights, their copies and "
                f"buffers take {self.resident_bytes / GiB:.2f} GiB and a step's transients "
                f"{self.transient_bytes / GiB:.2f} GiB; "
                "use a larger device, a quantized checkpoint, a smaller --max-num-batched-tokens / --max-num-seqs "
                "or more GPUs (--tensor-parallel-size)")
        if self.fit(self.max_model_len) < 1:
            longest = self.max_len_for_one()
            fits = f"at most --max-model-len {longest} fits (one sequence)" if longest > 0 else \
                "not even a short sequence fits"
            raise ValueError(
                f"--max-model-len {self.max_model_len} does not fit: one sequence needs "
                f"{self.seq_bytes(self.max_model_len) / GiB:.3f} GiB of KV cache and Mamba state, "
                f"{max(0, self.cache_bytes) / GiB:.3f} GiB is left for caches after weights "
                f"({self.resident_bytes / GiB:.2f} GiB with copies and buffers) and step transients "
                f"({self.transient_bytes / GiB:.2f} GiB); {fits}")

    def summary_lines(self, lengths: list[int] | None = None) -> list[str]:
        """The plan as text: the banner, `nemoh plan` and /metrics' help all read it from here."""
        c, g = self.config, GiB
        w = self.weights
        lines = [f"device memory {self.device_bytes / g:.2f} GiB x {self.utilization:g} = {self.usable_bytes / g:.2f}"
                 f" GiB usable; tensor parallel {self.tp}{' + expert parallel' if self.expert_parallel else ''}"
                 f" ({self.device_type})",
                 f"parameters {w.total_params / 1e9:.2f}B ({w.total_params:,}); weights "
                 f"{self.quant_algo or str(self.weight_dtype).removeprefix('torch.')}, "
                 f"{w.total_bytes / g:.2f} GiB in all, {self.resident.get('weights', 0) / g:.2f} GiB per device"]
        for kind in KINDS:
            if kind in w.bytes:
                fmts = "/".join(sorted(w.formats.get(kind, {"-"})))
                lines.append(f"  {kind:<20} {w.params.get(kind, 0) / 1e9:8.3f}B params {w.bytes[kind] / g:9.2f} GiB"
                             f"  ({fmts})")
        for name, value in self.resident.items():
            if name != "weights":
                lines.append(f"  + {name:<28} {value / g:9.2f} GiB")
        lines.append(f"transients per step {self.transient_bytes / g:.2f} GiB (max_num_batched_tokens "
                     f"{self.max_num_batched_tokens}, max_num_seqs {self.max_num_seqs}, MTP k "
                     f"{self.num_speculative_tokens})")
        if self.measured_transient is not None:
            lines.append(f"  measured by the start-up profiling step {self.measured_transient / g:9.3f} GiB "
                         f"({self.measured_by}); planned {self.estimated_transient_bytes / g:.3f} GiB:")
        for name, value in self.transient.items():
            lines.append(f"  {name:<30} {value / g:9.3f} GiB")
        lines.append(f"KV cache {str(self.kv_dtype).removeprefix('torch.')}: {self.kv_bytes_per_token:,} bytes per "
                     f"token ({self.kv_bytes_per_token * 1024 / 2**20:.2f} MiB per 1k tokens); Mamba state "
                     f"(ssm {str(self.ssm_dtype).removeprefix('torch.')}): {self.mamba_bytes_per_seq / 2**20:.1f} MiB "
                     f"per sequence")
        lines.append(f"left for caches {self.cache_bytes / g:.2f} GiB"
                     + (f", of it {self.snapshot_bytes / g:.2f} GiB for {self.prefix_snapshots} prefix-cache Mamba "
                        f"snapshots (--prefix-cache-state-slots; --no-enable-prefix-caching frees it)"
                        if self.prefix_snapshots else ""))
        for length in lengths or [self.max_model_len]:
            n = self.fit(length)
            lines.append(f"  {length:>8} tokens: {n} sequence{'s' if n != 1 else ''}"
                         + (" (max_num_seqs)" if n == self.max_num_seqs else "")
                         + f", {self.seq_bytes(length) / g:.3f} GiB each")
        longest = self.max_len_for_one()
        lines.append(f"  longest single sequence: {longest:,} tokens")
        return lines


def make_plan(config: NemotronHConfig, *, device_bytes: int, quant_config=None, dtype: torch.dtype = torch.bfloat16,
              kv_cache_dtype: torch.dtype | None = None, ssm_cache_dtype: torch.dtype | None = None,
              block_size: int = 16, max_model_len: int | None = None, max_num_seqs: int = 64,
              max_num_batched_tokens: int = 2048, num_speculative_tokens: int = 0, tp: int = 1,
              device_type: str = "cuda", utilization: float = 0.9, native_cpu_kernels: bool = True,
              cpu_packed_weights: bool = True, model: nn.Module | None = None,
              expert_parallel: bool = False) -> MemoryPlan:
    """The plan for one device of `device_bytes` (see the module docstring); `model`: an already built model
    (meta or loaded) to count instead of building one on the meta device."""
    from nemoh.distributed.layout import ParallelLayout

    layout = ParallelLayout(tp, 0, expert_parallel)
    layout.check(config, getattr(quant_config, "quant_algo", None))
    tensors = list(loaded_tensors(model) if model is not None else model_tensors(config, quant_config))
    weights = count_weights(tensors, config, dtype)
    k = num_speculative_tokens
    kv_dtype = kv_cache_dtype or dtype
    ssm_dtype = ssm_cache_dtype or getattr(torch, config.mamba_ssm_cache_dtype)
    max_model_len = max_model_len or config.max_position_embeddings
    # per device: each tensor's share by the sharding rules the loader reads with (nemoh.distributed.sharding)
    per_device = sum(weights.bytes.values()) if tp == 1 else device_share(tensors, config, dtype, layout)
    resident = {"weights": per_device}
    if device_type == "cpu":
        if native_cpu_kernels and dtype != torch.float32:
            resident["CPU panel copies"] = weights.linear_bytes // tp
        elif cpu_packed_weights:
            resident["CPU packed copies"] = weights.packable_fp32_bytes // tp
    kv_layers = len(config.attention_layer_ids) + (len(config.mtp_attention_layer_ids) if k else 0)
    kv_heads = max(1, config.num_key_value_heads // tp)
    kv_bytes_per_token = 2 * kv_layers * kv_heads * config.head_dim * _elem(kv_dtype)
    mamba_heads = config.mamba_num_heads // tp
    conv_dim = mamba_heads * config.mamba_head_dim + 2 * (config.n_groups // tp) * config.ssm_state_size
    slot = (conv_dim * (config.conv_kernel - 1) * _elem(dtype)
            + mamba_heads * config.mamba_head_dim * config.ssm_state_size * _elem(ssm_dtype))
    mamba_bytes_per_seq = len(config.mamba_layer_ids) * slot
    # the two largest step shapes: a full prefill chunk, and a verification (or decode) of every sequence
    prefill_tokens = max_num_batched_tokens
    step_rows = min(max_num_batched_tokens, max_num_seqs * (1 + k))
    prefill = activation_bytes(config, prefill_tokens, 1, prefill_tokens, dtype, max(1, k + 1), tp)
    verify = activation_bytes(config, step_rows, max(1, step_rows // (1 + k)), 1 + k, dtype, step_rows, tp)

    def peak(acts: dict[str, int]) -> int:
        layers = [v for name, v in acts.items() if name.endswith("layer")]
        return acts["residual stream"] + max(layers, default=0) + acts["logits"]

    transient = {}
    if peak(prefill) >= peak(verify):
        transient[f"prefill chunk of {prefill_tokens} tokens"] = peak(prefill)
    else:
        transient[f"step of {step_rows} rows"] = peak(verify)
    if k:
        verify_seqs = max(1, step_rows // (1 + k))
        # every Mamba layer keeps (1 + k) states per sequence until the roll-back, in buffers the engine allocates
        # once for max_num_seqs sequences (nemoh.engine.model_runner: verify_states), which captured and eager
        # verifications share; a verification computes one layer's states in float32 before they are stored
        resident[f"MTP verify states ({max_num_seqs} seqs x {1 + k} positions)"] = (
            max_num_seqs * (1 + k) * mamba_bytes_per_seq)
        transient[f"MTP verify, one layer's float32 states ({verify_seqs} seqs)"] = (
            2 * verify_seqs * (1 + k) * mamba_heads * config.mamba_head_dim * config.ssm_state_size * 4)
        # the MTP block drafts over the prefill chunk's rows too: one more layer's activations and its input
        transient["MTP draft over a chunk"] = 4 * prefill_tokens * config.hidden_size * _elem(dtype)
    if device_type == "cuda" and weights.largest_expert_stack:
        transient["expert stacking (first use)"] = weights.largest_expert_stack // tp
    return MemoryPlan(config=config, device_bytes=device_bytes, utilization=utilization, tp=tp, weights=weights,
                      weight_dtype=dtype, quant_algo=getattr(quant_config, "quant_algo", None), kv_dtype=kv_dtype,
                      ssm_dtype=ssm_dtype, block_size=block_size, max_model_len=max_model_len,
                      max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                      num_speculative_tokens=k, device_type=device_type, resident=resident, transient=transient,
                      kv_bytes_per_token=kv_bytes_per_token, mamba_bytes_per_seq=mamba_bytes_per_seq,
                      expert_parallel=expert_parallel and tp > 1)


def device_memory(device: torch.device) -> tuple[int, int]:
    """(total, available) bytes: the GPU's from the driver; a CPU's MemTotal / MemAvailable."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    info = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            name, value = line.split(":", 1)
            info[name] = int(value.split()[0]) * 1024
    if "MemAvailable" not in info:
        raise RuntimeError("cannot read MemAvailable from /proc/meminfo; pass cache_memory_gb")
    return info["MemTotal"], info["MemAvailable"]


def engine_plan(config: NemotronHConfig, args, max_model_len: int, device: torch.device, *, dtype: torch.dtype,
                quant_config=None, model: nn.Module | None = None, native_cpu_kernels: bool = True,
                measured=None, memory: tuple[int, int] | None = None) -> MemoryPlan:
    """The plan of an engine with `args` (EngineArgs) on `device`, with its cache budget: cache_memory_gb when
    given; on a GPU, gpu_memory_utilization of the device's total less weights, copies and transients (once
    the weights are loaded, also less what else holds GPU memory); on a CPU, cpu_memory_utilization of the
    available memory (less the weights when `model` is None: they are not loaded yet) less copies and
    transients. `model`: the loaded model, counted as it is. `measured`: the start-up profiling step's
    StepProfile, whose peak replaces the estimated transients; `memory`: (total, available) as read before it."""
    from nemoh.engine.kv_cache import kv_cache_dtype

    total, available = memory or device_memory(device)
    k = args.speculative_config.num_speculative_tokens if args.speculative_config else 0
    cuda = device.type == "cuda"
    ssm = getattr(torch, args.mamba_ssm_cache_dtype or config.mamba_ssm_cache_dtype)
    plan = make_plan(config, device_bytes=total if cuda else available, quant_config=quant_config, dtype=dtype,
                     kv_cache_dtype=kv_cache_dtype(args.kv_cache_dtype, dtype), ssm_cache_dtype=ssm,
                     block_size=args.block_size, max_model_len=max_model_len, max_num_seqs=args.max_num_seqs,
                     max_num_batched_tokens=args.max_num_batched_tokens, num_speculative_tokens=k,
                     device_type=device.type, utilization=args.gpu_memory_utilization if cuda else 1.0,
                     native_cpu_kernels=native_cpu_kernels, cpu_packed_weights=args.cpu_packed_weights, model=model)
    if measured is not None:
        plan.measured_transient, plan.measured_by = measured.peak_bytes, measured.method
    if args.cache_memory_gb is not None:
        plan.cache_budget = int(args.cache_memory_gb * GiB)
    elif cuda:
        # what the device holds now includes the loaded weights, not the rest of `resident` (allocated later)
        plan.cache_budget = None if model is None else (plan.cache_bytes - (total - available)
                                                        + plan.resident["weights"])
    else:
        copies = plan.resident_bytes - plan.resident["weights"]
        unloaded = plan.resident["weights"] if model is None else 0
        plan.cache_budget = max(0, int(max(0, available - unloaded - copies) * args.cpu_memory_utilization)
                                - plan.transient_bytes)
    if getattr(args, "enable_prefix_caching", False):
        requested = getattr(args, "prefix_cache_state_slots", None)
        plan.prefix_snapshots = requested if requested is not None else plan.default_prefix_snapshots(
            args.num_state_slots)
    return plan


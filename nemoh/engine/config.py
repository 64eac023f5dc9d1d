"""Engine settings: `EngineArgs` holds what users pass, with vLLM's names, validated on construction.

Values that need the model (the max_model_len default, cache sizes) are resolved by the engine once the model
is loaded; everything that can be checked without it is checked here.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

KV_CACHE_DTYPES = ("auto", "fp8", "float32", "float16", "bfloat16")
# How uniform decode / verification steps are captured (nemoh.engine.captured_step): auto = native plans on a
# CPU, CUDA graphs on a GPU; inductor = torch.compile of the graph-safe step; graph_eager = that step uncompiled.
CAPTURED_STEPS = ("auto", "native", "cuda_graph", "inductor", "graph_eager")
SSM_CACHE_DTYPES = ("float32", "float16", "bfloat16")
SPEC_METHODS = ("mtp",)


@dataclass
class SpeculativeConfig:
    method: str = "mtp"
    num_speculative_tokens: int = 1

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ValueError(f"speculative_config.method: must be one of {SPEC_METHODS}, got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(f"speculative_config.num_speculative_tokens: must be an integer in [1, 16], got {k!r}")

    @classmethod
    def from_any(cls, value: "SpeculativeConfig | dict | None") -> "SpeculativeConfig | None":
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config: expected a dict such as "
                             f'{{"method": "mtp", "num_speculative_tokens": 3}}, got {value!r}')
        unknown = set(value) - {"method", "num_speculative_tokens"}
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {sorted(unknown)}")
        return cls(**value)


@dataclass
class EngineArgs:
    """Everything `LLM(...)` / `AsyncLLMEngine(...)` / `nemoh serve` accept about the engine."""
    dtype: str = "auto"
    device: str = "cpu"
    tokenizer: str | None = None                   # directory with tokenizer.json (and the chat template);
                                                   # None: the model directory
    seed: int = 0                                  # seeds the generator of requests without their own seed
    # scheduling
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048             # per-step token budget (chunked prefill)
    max_model_len: int | None = None               # prompt + generated tokens; None: the model's context length
    enable_chunked_prefill: bool = True            # False: a prompt is prefilled in one step (budget permitting)
    max_step_seconds: float | None = None          # cap each step's prefill tokens so a step takes about this
                                                   # long (adapted to measured step times; nemoh serve: 0.25);
                                                   # None: only max_num_batched_tokens bounds a step
    max_waiting_requests: int = 1024               # async engine: bounded waiting queue
    # caches
    block_size: int = 16
    kv_cache_dtype: str = "auto"                   # "auto" = model dtype; "fp8" = float8_e4m3fn with scales
    mamba_ssm_cache_dtype: str | None = None       # None: the model config's (float32 by default)
    cache_memory_gb: float | None = None           # memory for KV blocks + Mamba slots; None: a fraction of free
    gpu_memory_utilization: float = 0.9            # fraction of free device memory used for caches on CUDA
    cpu_memory_utilization: float = 0.25           # fraction of available RAM used for caches on CPU
    cpu_packed_weights: bool = True                # CPU: multiply by oneDNN-packed copies of the weights of
                                                   # 131072+ elements (faster; one more copy of each in memory)
    enforce_eager: bool = False                    # True: every step runs the eager PyTorch forward (no captured
                                                   # steps; nemoh.engine.captured_step)
    captured_step: str = "auto"                    # one of CAPTURED_STEPS
    profile_memory: bool | None = None             # a start-up profiling step measures a step's peak transient
                                                   # memory (nemoh.engine.memory_profile); None: when the caches
                                                   # are sized from free memory (no cache_memory_gb/num_kv_blocks)
    num_kv_blocks: int | None = None               # explicit cache sizes (tests); override the memory budget
    num_state_slots: int | None = None
    # prefix caching (nemoh.engine.prefix_cache): on by default, as in vLLM
    enable_prefix_caching: bool = True
    prefix_cache_state_slots: int | None = None    # Mamba state snapshots kept for resume points; None: sized
                                                   # from the memory budget (up to 2 x the running slots)
    # speculative decoding
    speculative_config: SpeculativeConfig | dict | None = None
    # parallelism (nemoh.distributed): ranks over devices, one process each; rank 0 drives
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False          # routed experts split by expert instead of by width

    def __post_init__(self) -> None:
        self.speculative_config = SpeculativeConfig.from_any(self.speculative_config)

        def bad(name: str, why: str) -> None:
            raise ValueError(f"EngineArgs.{name}: {why} (got {getattr(self, name)!r})")

        def positive_int(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(name, "must be a positive integer")

        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_waiting_requests",
                     "tensor_parallel_size"):
            positive_int(name)
        for name in ("max_model_len", "num_kv_blocks", "num_state_slots"):
            positive_int(name, allow_none=True)
        slots = self.prefix_cache_state_slots
        if slots is not None and (not isinstance(slots, int) or isinstance(slots, bool) or slots < 0):
            bad("prefix_cache_state_slots", "must be a non-negative integer")
        if self.captured_step not in CAPTURED_STEPS:
            bad("captured_step", f"must be one of {CAPTURED_STEPS}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            bad("kv_cache_dtype", f"must be one of {KV_CACHE_DTYPES}")
        if self.mamba_ssm_cache_dtype is not None and self.mamba_ssm_cache_dtype not in SSM_CACHE_DTYPES:
            bad("mamba_ssm_cache_dtype", f"must be one of {SSM_CACHE_DTYPES}")
        if self.max_step_seconds is not None and not (isinstance(self.max_step_seconds, (int, float))
                                                      and 0 < self.max_step_seconds < float("inf")):
            bad("max_step_seconds", "must be a positive number of seconds or None")
        if self.cache_memory_gb is not None and not self.cache_memory_gb > 0:
            bad("cache_memory_gb", "must be > 0")
        for name in ("cpu_packed_weights", "enforce_eager", "enable_prefix_caching", "enable_expert_parallel"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")
        if self.profile_memory is not None and not isinstance(self.profile_memory, bool):
            bad("profile_memory", "must be True, False or None")
        for name in ("gpu_memory_utilization", "cpu_memory_utilization"):
            if not 0.0 < getattr(self, name) <= 1.0:
                bad(name, "must be in (0, 1]")
        spec = self.speculative_config
        if spec is not None and self.max_num_batched_tokens < 1 + spec.num_speculative_tokens:
            bad("max_num_batched_tokens", "must hold at least one verification step (1 + num_speculative_tokens)")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineArgs":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine arguments {unknown}; known: {sorted(known)}")
        return cls(**kwargs)

"""`nemoh plan MODEL_DIR`: what a checkpoint needs on one device and how many sequences of what length fit.

Reads config.json and the quantization config only (the model is built on the meta device: no weight is read,
so the plan works for a 120B checkpoint directory that holds no weights at all) and prints the memory plan
(nemoh.engine.memory_plan): resident weights by kind in the checkpoint's formats, the transients of a step at
the largest admitted shapes, KV bytes per token, Mamba bytes per sequence, and the sequences that fit. With
--gpu-memory-gib it plans for a GPU of that size (per GPU with --tensor-parallel-size); without it, for this
machine's CPU memory as `nemoh serve --device cpu` would use it.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nemoh.cli.common import CLIError, speculative_config, Checkpoint

GiB = 1024 ** 3
LENGTHS = (4096, 8192, 32768, 131072, 262144, 1048576)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="memory plan: how many sequences of what length fit on a device",
                       description="Print the memory plan of a checkpoint (config.json + quantization config only, "
                                   "no weights read) for a device memory size.")
    p.add_argument("model", metavar="MODEL_DIR", help="checkpoint directory (or its config.json)")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="memory of one GPU in GiB (H200 141 GB = 131.3 GiB; B200 180 GB = 167.6 GiB; H100 80 GB "
                        "= 74.5 GiB); default: plan for this machine's CPU memory")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the model is sharded over")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="with --tensor-parallel-size: routed experts split by expert instead of by width")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length (default: the checkpoint's max_position_embeddings)")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-dtype", default="auto", help="auto, fp8, bfloat16, float16, float32")
    p.add_argument("--mamba-ssm-cache-dtype", default=None, help="float32 (default), float16, bfloat16")
    p.add_argument("--dtype", default="auto", help="dtype of unquantized weights (default: the checkpoint's)")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="default: MTP k=3 when the checkpoint has an MTP block; none turns it off")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="set memory aside for the prefix cache's Mamba state snapshots, as serve does (default: on)")
    p.add_argument("--prefix-cache-state-slots", type=int, default=None,
                   help="Mamba state snapshots for the prefix cache (default: sized as serve sizes them)")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths to show (tokens)")
    p.set_defaults(handler=run_plan)
    return p


def _config(model: str):
    from nemoh.config import NemotronHConfig
    from nemoh.quant.modelopt import QuantConfig

    path = Path(model).expanduser()
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if not path.is_dir():
        raise CLIError(f"{model}: no such checkpoint directory")
    if not (path / "config.json").is_file():
        raise CLIError(f"{model} has no config.json; MODEL_DIR is a Hugging Face checkpoint directory")
    try:
        config = NemotronHConfig.from_pretrained(path)
        return path, config, QuantConfig.from_model_dir(path)
    except ValueError as e:
        raise CLIError(str(e)) from None


def run_plan(args: argparse.Namespace) -> int:
    import torch

    from nemoh.engine.config import EngineArgs
    from nemoh.engine.memory_plan import engine_plan, make_plan
    from nemoh.engine.kv_cache import kv_cache_dtype
    from nemoh.cli.common import flag_names
    from nemoh.loader import resolve_dtype

    path, config, qcfg = _config(args.model)
    if args.tensor_parallel_size < 1:
        raise CLIError("--tensor-parallel-size must be >= 1")
    kwargs = {k: v for k, v in {
        "kv_cache_dtype": args.kv_cache_dtype, "mamba_ssm_cache_dtype": args.mamba_ssm_cache_dtype,
        "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens, "block_size": args.block_size,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "enable_prefix_caching": args.enable_prefix_caching,
        "prefix_cache_state_slots": args.prefix_cache_state_slots,
        "speculative_config": speculative_config(args.speculative_config, Checkpoint(path, config)),
    }.items() if v is not None}
    try:
        engine_args = EngineArgs.from_kwargs(**kwargs)
        dtype = resolve_dtype(args.dtype, config)
    except ValueError as e:
        raise CLIError(flag_names(str(e))) from None
    max_model_len = engine_args.max_model_len or config.max_position_embeddings
    k = engine_args.speculative_config.num_speculative_tokens if engine_args.speculative_config else 0
    try:
        if args.gpu_memory_gib is None:
            plan = engine_plan(config, engine_args, max_model_len, torch.device("cpu"), dtype=dtype,
                               quant_config=qcfg)
        else:
            if not args.gpu_memory_gib > 0:
                raise CLIError("--gpu-memory-gib must be > 0")
            plan = make_plan(config, device_bytes=int(args.gpu_memory_gib * GiB), quant_config=qcfg, dtype=dtype,
                             kv_cache_dtype=kv_cache_dtype(engine_args.kv_cache_dtype, dtype),
                             ssm_cache_dtype=getattr(torch, engine_args.mamba_ssm_cache_dtype or
                                                     config.mamba_ssm_cache_dtype),
                             block_size=engine_args.block_size, max_model_len=max_model_len,
                             max_num_seqs=engine_args.max_num_seqs,
                             max_num_batched_tokens=engine_args.max_num_batched_tokens, num_speculative_tokens=k,
                             tp=args.tensor_parallel_size, expert_parallel=args.enable_expert_parallel,
                             device_type="cuda",
                             utilization=engine_args.gpu_memory_utilization)
            if engine_args.enable_prefix_caching:
                plan.prefix_snapshots = (engine_args.prefix_cache_state_slots
                                         if engine_args.prefix_cache_state_slots is not None
                                         else plan.default_prefix_snapshots())
        plan.check_fits()
    except ValueError as e:
        raise CLIError(flag_names(str(e))) from None
    lengths = args.lengths or sorted({n for n in LENGTHS if n < max_model_len} | {max_model_len})
    print(f"nemoh plan for {path} ({config.num_hidden_layers} layers: {config.layer_types.count('mamba')} Mamba, "
          f"{config.layer_types.count('moe')} MoE, {config.layer_types.count('attention')} attention"
          f"{', MTP ' + ''.join('*' if t == 'attention' else 'E' for t in config.mtp_layer_types) if config.has_mtp else ''})")
    for line in plan.summary_lines(lengths):
        print(line)
    if args.gpu_memory_gib is None:
        print(f"(CPU: the caches get cpu_memory_utilization {engine_args.cpu_memory_utilization:g} of the memory "
              "available after the weights and their copies, less the transients)")
    return 0

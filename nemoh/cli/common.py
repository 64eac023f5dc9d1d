"""What the commands share: user errors, the argument parser, the checkpoint to load, the engine flags.

Every check that can be made without loading the model is made here, before it is loaded, so a mistake costs a
second, not a model load, and is reported as one line that names the flag or file.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemoh.config import NemotronHConfig

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
DEMO_MODEL_DIR = DEMO_DIR / "model"
# MTP speculative decoding is on wherever the checkpoint has an MTP block (nemoh serve, generate and chat
# alike). k=3: on the demo model a 4-token verification costs 1.3-1.4 plain forwards in bfloat16 and ~2.4 tokens
# are accepted (README, "The demo model").
DEFAULT_SPECULATIVE_CONFIG = {"method": "mtp", "num_speculative_tokens": 3}
OFF = ("none", "off", "{}")


class CLIError(Exception):
    """A user mistake: printed as `nemoh: error: ...` (one line), exit status 2."""


class UsageError(CLIError):
    """argparse's complaint about the command line (unknown flag, bad value)."""


class CLIParser(argparse.ArgumentParser):
    """argparse without its usage dump: an error is one line (main adds where to find the flags)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # no abbreviations: with vLLM's many flags, `--trust` or `--disable-log` would pick one silently
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


# ---------------------------------------------------------------------------------------------- the checkpoint


@dataclass
class Checkpoint:
    path: Path
    config: NemotronHConfig

    @property
    def is_demo(self) -> bool:
        """The bundled demo model or its bundled NVFP4 copy (both live in nemoh/demo/)."""
        return self.path.resolve().parent == DEMO_DIR


def has_weights(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def resolve_model(model: str | None) -> Checkpoint:
    """The checkpoint to load (with no MODEL the bundled demo model), its config read and checked."""
    if model is None:
        if not has_weights(DEMO_MODEL_DIR):
            raise CLIError(f"no MODEL given and the bundled demo model at {DEMO_MODEL_DIR} has no weights; pass a "
                           "checkpoint directory (nemoh serve /path/to/Nemotron-3-checkpoint) or train the demo "
                           "model first (nemoh train)")
        path = DEMO_MODEL_DIR
    else:
        path = Path(model).expanduser()
        if path.is_file():
            raise CLIError(f"{model} is a file; MODEL is a checkpoint directory (config.json + *.safetensors): "
                           f"pass the directory that holds it, {path.resolve().parent}")
        if not path.is_dir():
            raise CLIError(f"model directory {model} does not exist; nemoh loads local checkpoints only (download "
                           "one first, e.g. `hf download REPO --local-dir DIR`, and pass DIR)")
        if not (path / "config.json").is_file():
            raise CLIError(f"{model} has no config.json; MODEL is a Hugging Face checkpoint directory")
    try:
        config = NemotronHConfig.from_pretrained(path)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if not any(path.glob("*.safetensors")):
        raise CLIError(f"{path} has no *.safetensors weights (nemoh never loads pickle .bin/.pt files)")
    return Checkpoint(path, config)


def load_chat_template(template_dir: Path, template_file: str | None) -> Any:
    """The chat template of `template_dir` (the model's, or --tokenizer's), or --chat-template FILE with the
    special tokens of `template_dir`."""
    from nemoh.chat import ChatTemplate, TemplateError

    try:
        if template_file is None:
            return ChatTemplate.from_model_dir(template_dir)
        source = Path(template_file).read_text(encoding="utf-8")
        special = ChatTemplate.from_model_dir(template_dir).special_tokens if (
            (template_dir / "chat_template.jinja").is_file() or (template_dir / "tokenizer_config.json").is_file()
        ) else {}
        return ChatTemplate(source, special_tokens=special)
    except OSError as e:
        raise CLIError(f"--chat-template: {e.strerror}: {e.filename}") from None
    except TemplateError as e:
        raise CLIError(f"chat template: {e}") from None


# ---------------------------------------------------------------------------------------------- engine flags


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="auto",
                   help="weights/activations dtype: auto (the checkpoint's), bfloat16, float16, float32")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length, prompt + output (default: the checkpoint's max_position_embeddings)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="sequences decoded together")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per engine step")
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV-cache block (default 16)")
    g.add_argument("--kv-cache-dtype", default="auto", help="auto, fp8, bfloat16, float16, float32")
    g.add_argument("--mamba-ssm-cache-dtype", default=None, help="float32 (default), float16, bfloat16")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='default: \'{"method":"mtp","num_speculative_tokens":3}\' when the checkpoint has an MTP '
                        "block; none (or '{}') turns speculative decoding off")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV blocks and Mamba states of prompts already computed (default: on)")
    g.add_argument("--prefix-cache-state-slots", type=int, default=None, metavar="N",
                   help="Mamba state snapshots the prefix cache keeps (default: sized from the cache memory)")
    g.add_argument("--enforce-eager", action="store_true", default=None,
                   help="always run the plain PyTorch step (no compiled fast path)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None)
    g.add_argument("--cache-memory-gb", type=float, default=None, help="memory for KV blocks + Mamba state slots")
    g.add_argument("--profile-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="measure a step's peak transient memory at start-up with dummy steps at the largest shapes "
                        "and size the caches from what is left; default on unless --cache-memory-gb is given")
    g.add_argument("--cpu-packed-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU: oneDNN-packed copies of the weights of 131072+ elements (faster; more memory); "
                        "default on")
    g.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="directory with the tokenizer.json and chat template to use (default: the model's)")
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="ranks the model is sharded over, one process per GPU (or CPU process); under torchrun, "
                        "its WORLD_SIZE")
    g.add_argument("--enable-expert-parallel", action="store_true", default=False,
                   help="with --tensor-parallel-size: routed experts split by expert instead of by width")
    g.add_argument("--seed", type=int, default=None)


def speculative_config(text: str | None, ckpt: Checkpoint) -> dict | None:
    """--speculative-config: MTP k=3 when the checkpoint has an MTP block and the flag is not given."""
    if text is None:
        return dict(DEFAULT_SPECULATIVE_CONFIG) if ckpt.config.has_mtp else None
    if text.strip().lower() in OFF:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise CLIError(f"--speculative-config is not valid JSON ({e}); e.g. "
                       '\'{"method":"mtp","num_speculative_tokens":3}\', or none to turn it off') from None
    if not isinstance(value, dict):
        raise CLIError('--speculative-config must be a JSON object such as {"method":"mtp","num_speculative_tokens":3}'
                       " (or none to turn it off)")
    return value or None


def resolve_device(flag: str | None) -> str:
    """--device, checked against this torch build and machine (default: cuda when a GPU is visible)."""
    import torch

    if flag is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise CLIError(f"--device {flag}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return flag
    if device.type != "cuda":
        raise CLIError(f"--device {flag}: nemoh runs on cpu or cuda")
    if torch.version.cuda is None:
        raise CLIError(f"--device {flag}: this torch ({torch.__version__}) is built without CUDA; use --device cpu, "
                       "or install a CUDA build of torch")
    if not torch.cuda.is_available():
        raise CLIError(f"--device {flag}: no CUDA GPU is visible to torch; use --device cpu, or check the driver "
                       "and CUDA_VISIBLE_DEVICES")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {flag}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                       f"cuda:{torch.cuda.device_count() - 1}")
    return flag


def engine_kwargs(args: argparse.Namespace, ckpt: Checkpoint) -> dict[str, Any]:
    """EngineArgs from the flags, with the defaults that are the same for every checkpoint."""
    if args.tokenizer is not None and not (Path(args.tokenizer) / "tokenizer.json").is_file():
        raise CLIError(f"--tokenizer {args.tokenizer}: no tokenizer.json there; pass the directory that holds it")
    kwargs: dict[str, Any] = {"dtype": args.dtype, "device": resolve_device(args.device),
                              "kv_cache_dtype": args.kv_cache_dtype,
                              "speculative_config": speculative_config(args.speculative_config, ckpt),
                              "tensor_parallel_size": args.tensor_parallel_size,
                              "enable_expert_parallel": args.enable_expert_parallel}
    check_parallel(kwargs, ckpt)
    optional = {
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "block_size": args.block_size,
        "mamba_ssm_cache_dtype": args.mamba_ssm_cache_dtype,
        "enable_chunked_prefill": args.enable_chunked_prefill,
        "enable_prefix_caching": args.enable_prefix_caching,
        "prefix_cache_state_slots": args.prefix_cache_state_slots,
        "enforce_eager": args.enforce_eager,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "cache_memory_gb": args.cache_memory_gb,
        "profile_memory": args.profile_memory,
        "cpu_packed_weights": args.cpu_packed_weights,
        "tokenizer": args.tokenizer,
        "seed": args.seed,
        "max_waiting_requests": getattr(args, "max_waiting_requests", None),   # nemoh serve's queue
        "max_step_seconds": getattr(args, "max_step_seconds", None) or None,   # nemoh serve's step time budget
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    from nemoh.engine.config import EngineArgs
    from nemoh.loader import DTYPES

    if args.dtype != "auto" and args.dtype not in DTYPES:
        raise CLIError(f"--dtype {args.dtype}: choose auto (the checkpoint's), bfloat16, float16 or float32")
    if kwargs["speculative_config"] is not None and not ckpt.config.has_mtp:
        raise CLIError(f"--speculative-config: MTP needs a checkpoint with an MTP block and {ckpt.path} has none "
                       "(num_nextn_predict_layers is 0); leave the flag out")
    try:  # every value that can be checked without the model is checked now, not after loading it
        EngineArgs.from_kwargs(**kwargs)
    except ValueError as e:
        raise CLIError(flag_names(str(e))) from None
    return kwargs


def check_parallel(kwargs: dict[str, Any], ckpt: Checkpoint) -> None:
    """--tensor-parallel-size / --enable-expert-parallel against the model's sizes and this machine's devices,
    before any weight is read (nemoh.distributed.layout)."""
    from nemoh.distributed.launch import check_devices
    from nemoh.distributed.layout import ParallelLayout
    from nemoh.quant.modelopt import QuantConfig

    n = kwargs["tensor_parallel_size"]
    if not isinstance(n, int) or n < 1:
        raise CLIError(f"--tensor-parallel-size {n}: must be a positive integer")
    try:
        qcfg = QuantConfig.from_model_dir(ckpt.path)
        ParallelLayout(n, 0, kwargs["enable_expert_parallel"]).check(ckpt.config, qcfg.quant_algo if qcfg else None)
        check_devices(n, kwargs["device"])
    except ValueError as e:
        raise CLIError(str(e)) from None


def flag_names(message: str) -> str:
    """An EngineArgs message with the field names written as the flags that set them."""
    message = re.sub(r"EngineArgs\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), message)
    return re.sub(r"^speculative_config\b", "--speculative-config", message)


def check_memory_plan(kwargs: dict[str, Any], ckpt: Checkpoint) -> None:
    """Refuse, before any weight is read, a start whose plan cannot hold one sequence of --max-model-len (or
    not even the model): the one-line error says what fits (nemoh.engine.memory_plan)."""
    import torch

    from nemoh.engine.config import EngineArgs
    from nemoh.engine.memory_plan import engine_plan
    from nemoh.loader import resolve_dtype
    from nemoh.quant.modelopt import QuantConfig

    args = EngineArgs.from_kwargs(**kwargs)
    config = ckpt.config
    try:
        if args.tensor_parallel_size > 1:     # each rank checks its own share once it has loaded it
            return
        plan = engine_plan(config, args, args.max_model_len or config.max_position_embeddings,
                           torch.device(args.device), dtype=resolve_dtype(args.dtype, config),
                           quant_config=QuantConfig.from_model_dir(ckpt.path))
        plan.check_fits()
    except ValueError as e:
        raise CLIError(flag_names(str(e))) from None

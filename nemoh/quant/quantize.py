"""`nemoh quantize SRC DST`: a BF16/FP32 HF checkpoint -> a ModelOpt-layout NVFP4 or FP8 checkpoint.

Tensors are streamed one at a time from the source shards and written in new shards of about
`shard_size_bytes`; the whole model is never held in memory (except during optional calibration,
which has to run it).

Which Linear weights are quantized: every 2-D `<module>.weight` whose module no exclude glob
matches. DEFAULT_EXCLUDES mirror what the Super NVFP4 model card keeps in higher precision:
embeddings, lm_head, router gates, attention q/k/v/o, the latent projections and the whole MTP
block. Norms, conv1d, A_log, D, dt_bias are not 2-D Linear weights and are never quantized.
Everything not quantized is written as bf16, except A_log, D, dt_bias and e_score_correction_bias
which keep their source dtype (routing ties and the SSM decay are the most precision-sensitive
parameters, and they are tiny).

input_scale (activation scale): only with calibration (`calib_file`), as ModelOpt computes it:
amax / (6*448) for NVFP4, amax / 448 for FP8. An uncalibrated NVFP4 checkpoint is declared
quant_algo "W4A16_NVFP4" -- ModelOpt's name for weight-only NVFP4, which vLLM loads without an
input_scale -- rather than "NVFP4", whose W4A4 kernels would read a missing activation scale.
FP8 requires calibration: ModelOpt's per-tensor "FP8" is W8A8 with a static input_scale that its
consumers read unconditionally, and ModelOpt has no per-tensor weight-only FP8 algo to declare
instead. A made-up input_scale of 1.0 is not written: it would silently underflow activations.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemoh.quant.fp8 import FP8_E4M3_MAX, quantize_fp8
from nemoh.quant.nvfp4 import E2M1_MAX, NVFP4_GROUP_SIZE, quantize_nvfp4

logger = logging.getLogger(__name__)

DEFAULT_EXCLUDES = [
    "backbone.embeddings",
    "lm_head",
    "*.mixer.gate",
    "*.mixer.q_proj",
    "*.mixer.k_proj",
    "*.mixer.v_proj",
    "*.mixer.o_proj",
    "*.mixer.fc1_latent_proj",
    "*.mixer.fc2_latent_proj",
    "mtp*",
]
KEEP_SOURCE_DTYPE = ("A_log", "D", "dt_bias", "e_score_correction_bias")
QUANT_ALGOS = {("nvfp4", True): "NVFP4", ("nvfp4", False): "W4A16_NVFP4", ("fp8", True): "FP8"}
DEFAULT_SHARD_SIZE_BYTES = 4 * 1024**3
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_NOT_COPIED_NAMES = ("config.json", "hf_quant_config.json", "model.safetensors.index.json")


def is_excluded(module_name: str, patterns: list[str]) -> bool:
    """Same rule as QuantConfig.is_excluded: a glob matching the module or one of its parents."""
    return any(fnmatchcase(module_name, p) or fnmatchcase(module_name, p + ".*") for p in patterns)


def quantize_checkpoint(
    src_dir: str | Path,
    dst_dir: str | Path,
    fmt: str = "nvfp4",
    exclude: list[str] | None = None,
    calib_file: str | Path | None = None,
    calib_samples: int = 64,
    calib_max_tokens: int = 512,
    shard_size_bytes: int = DEFAULT_SHARD_SIZE_BYTES,
    progress: bool = True,
) -> dict:
    """Write a ModelOpt-layout checkpoint of `src_dir` to `dst_dir`; returns the quantization block.

    fmt: "nvfp4" | "fp8". exclude: extra globs added to DEFAULT_EXCLUDES.
    """
    fmt = fmt.lower()
    if fmt not in ("nvfp4", "fp8"):
        raise ValueError(f"fmt must be 'nvfp4' or 'fp8', got {fmt!r}")
    if fmt == "fp8" and calib_file is None:
        raise ValueError(
            "fmt 'fp8' needs calib_file (--calib): ModelOpt FP8 checkpoints carry a static input_scale "
            "that FP8 consumers read, and there is no per-tensor weight-only FP8 quant_algo to declare instead"
        )
    src, dst = Path(src_dir), Path(dst_dir)
    if calib_file is not None and not Path(calib_file).is_file():
        raise ValueError(f"calib_file (--calib) {calib_file}: no such file")
    if not (src / "config.json").is_file():
        what = "is a file" if src.is_file() else "has no config.json" if src.is_dir() else "does not exist"
        raise ValueError(f"source {src} {what}; SRC is a BF16/FP32 checkpoint directory (config.json + safetensors)")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"destination {dst} exists and is not empty; pass a new or empty directory "
                         "(nothing is overwritten)")
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{src}/config.json already has a quantization_config; quantize a BF16/FP32 checkpoint")
    dst.mkdir(parents=True, exist_ok=True)
    patterns = DEFAULT_EXCLUDES + [p for p in (exclude or []) if p not in DEFAULT_EXCLUDES]

    shard_files = _source_shards(src)
    to_quantize = _quantizable_modules(shard_files, patterns)
    input_amax: dict[str, float] = {}
    if calib_file is not None:
        input_amax = calibrate(src, sorted(to_quantize), calib_file, calib_samples, calib_max_tokens, progress)
    calibrated = bool(input_amax)
    quant_algo = QUANT_ALGOS[(fmt, calibrated)]

    writer = _ShardWriter(dst, shard_size_bytes)
    total = sum(len(keys) for keys in _keys_by_shard(shard_files).values())
    bar = _progress(total, "quantize", progress)
    for name, tensor in _stream(shard_files):
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module in to_quantize:
            for key, value in _quantize_weight(tensor, fmt).items():
                writer.add(f"{module}.{key}", value)
            if calibrated:
                divisor = E2M1_MAX * FP8_E4M3_MAX if fmt == "nvfp4" else FP8_E4M3_MAX
                writer.add(f"{module}.input_scale", torch.tensor(input_amax[module] / divisor, dtype=torch.float32))
        else:
            writer.add(name, _passthrough(leaf, tensor))
        bar.update(1)
    bar.close()
    writer.finish()

    quantization = {
        "quant_algo": quant_algo,
        "kv_cache_quant_algo": None,
        "exclude_modules": patterns,
    }
    if fmt == "nvfp4":
        quantization["group_size"] = NVFP4_GROUP_SIZE
    producer = {"name": "nemoh", "version": "0.1.0"}
    (dst / "hf_quant_config.json").write_text(
        json.dumps({"producer": producer, "quantization": quantization}, indent=2) + "\n"
    )
    config["quantization_config"] = {
        "quant_method": "modelopt",
        **quantization,
        "ignore": patterns,  # the key vLLM reads in config.json
        "producer": producer,
    }
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in src.iterdir():
        if path.is_file() and path.name not in _NOT_COPIED_NAMES and not path.name.endswith(_NOT_COPIED_SUFFIXES):
            shutil.copy2(path, dst / path.name)
    logger.info("wrote %s (%s, %d quantized modules)", dst, quant_algo, len(to_quantize))
    return config["quantization_config"]


# --- source reading ----------------------------------------------------------------------------


def _source_shards(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [src / f for f in sorted(set(weight_map.values()))]
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(f"{src}: no model.safetensors or model.safetensors.index.json")


def _keys_by_shard(shard_files: list[Path]) -> dict[Path, list[str]]:
    out = {}
    for path in shard_files:
        with safe_open(str(path), framework="pt") as f:
            out[path] = sorted(f.keys())
    return out


def _stream(shard_files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in shard_files:
        with safe_open(str(path), framework="pt") as f:
            for key in sorted(f.keys()):
                yield key, f.get_tensor(key)


def _quantizable_modules(shard_files: list[Path], patterns: list[str]) -> set[str]:
    """Modules whose `.weight` is 2-D floating point and not excluded (read from headers only)."""
    modules = set()
    for path in shard_files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                module, _, leaf = key.rpartition(".")
                if leaf != "weight" or is_excluded(module, patterns):
                    continue
                sl = f.get_slice(key)
                if len(sl.get_shape()) == 2 and sl.get_dtype() in ("BF16", "F16", "F32"):
                    modules.add(module)
    return modules


def _quantize_weight(weight: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "nvfp4":
        packed, scale, scale_2 = quantize_nvfp4(weight)
        return {"weight": packed, "weight_scale": scale, "weight_scale_2": scale_2}
    q, scale = quantize_fp8(weight)
    return {"weight": q, "weight_scale": scale}


def _passthrough(leaf: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point() or leaf in KEEP_SOURCE_DTYPE:
        return tensor
    return tensor.to(torch.bfloat16)


class _ShardWriter:
    """Accumulates tensors into shards of about `shard_size` bytes and writes the index."""

    def __init__(self, dst: Path, shard_size: int) -> None:
        self.dst, self.shard_size = dst, shard_size
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_size:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_size += nbytes

    def _flush(self) -> None:
        path = self.dst / f".shard-{len(self.written):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending or not self.written:
            self._flush()
        n = len(self.written)
        weight_map = {}
        for i, (tmp, names) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.rename(self.dst / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --- calibration -------------------------------------------------------------------------------


def read_calib_samples(calib_file: str | Path, limit: int) -> list[str]:
    """One sample per line, or JSONL objects with a "text" field; blank lines are skipped."""
    samples = []
    for line in Path(calib_file).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            obj = json.loads(line)
            if "text" not in obj:
                raise ValueError(f"{calib_file}: JSONL line without a 'text' field: {line[:80]}")
            line = obj["text"]
        samples.append(line)
        if len(samples) >= limit:
            break
    if not samples:
        raise ValueError(f"{calib_file}: no calibration samples")
    return samples


def calibrate(
    src: Path, modules: list[str], calib_file: str | Path, calib_samples: int, max_tokens: int, progress: bool
) -> dict[str, float]:
    """Activation amax at the input of each module in `modules`, over up to `calib_samples` texts.

    Routed experts that no calibration token reached get the largest amax among the experts of the
    same layer (their siblings saw the same inputs); anything else uncovered gets the largest amax
    seen anywhere, so every quantized module has an input_scale.
    """
    from tokenizers import Tokenizer

    import nemoh

    model = nemoh.load_model(str(src), dtype="float32")
    model.eval()
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    wanted = set(modules)
    amax: dict[str, float] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module, args):
            value = float(args[0].detach().abs().amax()) if args[0].numel() else 0.0
            amax[name] = max(amax.get(name, 0.0), value)

        return hook

    for name, module in model.named_modules():
        if name in wanted:
            handles.append(module.register_forward_pre_hook(make_hook(name)))
    if not handles:
        raise ValueError("calibration: none of the modules to quantize were found in the loaded model")
    try:
        samples = read_calib_samples(calib_file, calib_samples)
        bar = _progress(len(samples), "calibrate", progress)
        with torch.inference_mode():
            for text in samples:
                ids = tokenizer.encode(text).ids[:max_tokens]
                if ids:
                    model(torch.tensor([ids], dtype=torch.long))
                bar.update(1)
        bar.close()
    finally:
        for h in handles:
            h.remove()
    if not amax:
        raise ValueError("calibration: no activations were recorded")
    overall = max(amax.values())
    for name in modules:
        if name in amax:
            continue
        head, sep, _ = name.partition(".experts.")
        siblings = [v for k, v in amax.items() if sep and k.startswith(head + sep)]
        amax[name] = max(siblings) if siblings else overall
    return amax


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not (enabled and sys.stderr.isatty()))


# --- CLI ---------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="source checkpoint directory (BF16/FP32 safetensors)")
    p.add_argument("dst", help="destination directory (must be empty or absent)")
    p.add_argument("--format", dest="fmt", choices=("nvfp4", "fp8"), default="nvfp4")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="module glob kept in BF16, added to the defaults (repeatable)")
    p.add_argument("--calib", dest="calib_file", default=None, metavar="FILE",
                   help="text file (one sample a line) or JSONL with 'text', for input_scale")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--shard-size-gb", type=float, default=DEFAULT_SHARD_SIZE_BYTES / 1024**3)
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run_cli(args: argparse.Namespace) -> int:
    qc = quantize_checkpoint(
        args.src, args.dst, fmt=args.fmt, exclude=args.exclude, calib_file=args.calib_file,
        calib_samples=args.calib_samples, shard_size_bytes=int(args.shard_size_gb * 1024**3),
        progress=args.progress,
    )
    print(f"wrote {args.dst}: quant_algo={qc['quant_algo']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nemoh quantize", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

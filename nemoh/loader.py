"""Safetensors checkpoints (single file or sharded with an index) -> a NemotronH module, with validation.

The model is built on the meta device, quantized modules are swapped in where the checkpoint's own config
declares them, parameters are allocated once in their final dtype, and every tensor is read straight from
the shard file into its parameter. Peak memory is the model plus one tensor. Only safetensors are
read (never pickle), and shard names from an index must be plain file names inside the model directory.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections import defaultdict

import torch
from torch import nn

from nemoh.config import NemotronHConfig
from nemoh.models.nemotron_h import NemotronHForCausalLM
from nemoh.safetensors_reader import SafetensorsFile, SafetensorsFormatError

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
KV_SCALE_RE = re.compile(r"^(?:backbone|mtp)\.layers\.(\d+)\.mixer\.([kv])_proj\.([kv])_scale$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


def resolve_dtype(dtype: str | torch.dtype, config: NemotronHConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return DTYPES.get(str(config.torch_dtype or "bfloat16"), torch.bfloat16)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unsupported {dtype!r}; choose auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def shard_map(model_dir: str) -> dict[str, str]:
    """Tensor name -> absolute shard path, from the index or the single file."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
        out = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise CheckpointError(f"{index_path}: tensor {name!r} points to {shard!r}, "
                                      "which is not a plain file name inside the model directory")
            if not shard.endswith(".safetensors"):
                raise CheckpointError(f"{index_path}: tensor {name!r} points to {shard!r}; only .safetensors "
                                      "shards are loaded (never pickle)")
            out[name] = os.path.join(model_dir, shard)
        return out
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        with _open(single) as f:
            return {name: single for name in f.tensors}
    pickles = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {pickles[0]}: pickle checkpoints are never loaded; convert to safetensors)" if pickles else ""
    raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _open(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: shard file is missing")
    try:
        return SafetensorsFile(path)
    except (SafetensorsFormatError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file: {e}") from None


def _build_model(config: NemotronHConfig, model_dir: str, dtype: torch.dtype, device: torch.device,
                 layout=None, tp=None):
    from nemoh.quant.modelopt import QuantConfig
    from nemoh.quant.linear import apply_quantization

    qcfg = QuantConfig.from_model_dir(model_dir)
    with torch.device("meta"):
        if layout is None:
            model = NemotronHForCausalLM(config)
        else:           # one tensor-parallel rank's share (nemoh.distributed.sharding)
            from nemoh.distributed.sharding import build_local_model

            layout.check(config, qcfg.quant_algo if qcfg is not None else None)
            model = build_local_model(config, layout, tp)
    if qcfg is not None:
        apply_quantization(model, qcfg)
    if layout is not None:
        from nemoh.distributed.sharding import keep_local_experts

        keep_local_experts(model, config, layout)
    model.quant_config = qcfg
    # Allocate every tensor once, in its final dtype, without touching its pages (torch.empty_like from the
    # meta device would fault them in, doubling peak memory before a byte is read).
    for module in model.modules():
        keep_fp32 = getattr(module, "keep_fp32", False)
        for registry, wrap in ((module._parameters, True), (module._buffers, False)):
            for name, t in list(registry.items()):
                if t is None:
                    continue
                exact = not t.is_floating_point() or t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
                new_dtype = t.dtype if exact else (torch.float32 if keep_fp32 else dtype)
                new = torch.empty(t.shape, dtype=new_dtype, device=device)
                registry[name] = nn.Parameter(new, requires_grad=False) if wrap else new
    return model


def _check_and_copy(target: torch.Tensor, shard: SafetensorsFile, name: str, rule: str | None) -> None:
    """Validate the stored tensor against its destination, then read it in (directly when dtypes match)."""
    info = shard.tensors[name]
    hint = f" — rule: {rule}" if rule else ""
    same_numel = info.end - info.start == target.numel() * info.dtype.itemsize
    if list(info.shape) != list(target.shape) and not (target.numel() == 1 and same_numel):
        raise CheckpointError(f"{shard.path}: tensor {name!r} has shape {info.shape}, "
                              f"expected {list(target.shape)}{hint}")
    exact = target.dtype in (torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)
    if (exact and info.dtype != target.dtype) or (target.is_floating_point() != info.dtype.is_floating_point):
        raise CheckpointError(f"{shard.path}: tensor {name!r} has dtype {info.dtype}, expected {target.dtype}{hint}")
    try:
        if info.dtype == target.dtype and target.device.type == "cpu" and target.is_contiguous():
            shard.read_into(name, target)
        else:
            target.copy_(shard.read(name).reshape(target.shape))
    except (SafetensorsFormatError, OSError) as e:
        raise CheckpointError(f"{shard.path}: tensor {name!r} cannot be read: {e}") from None


def _read_share(target: torch.Tensor, shard: SafetensorsFile, name: str, share) -> None:
    """Tensor parallel: read this rank's rows or columns of `name` (nemoh.distributed.sharding.TensorSlice)."""
    info = shard.tensors[name]
    if share.zero:
        target.zero_()
        return
    shape = list(info.shape)
    size = sum(b - a for a, b in share.ranges)
    shape[share.dim] = size
    buf = torch.empty(shape, dtype=info.dtype)
    rows = target.shape[0] if target.dim() else 0
    fits = list(buf.shape) == list(target.shape) or (
        share.dim == 0 and size <= rows and list(buf.shape[1:]) == list(target.shape[1:]))   # a padded vocab slice
    if not fits or info.dtype.is_floating_point != target.is_floating_point():
        raise CheckpointError(f"{shard.path}: tensor {name!r} of shape {info.shape}: this rank's share "
                              f"{list(buf.shape)} ({share.ranges} of dim {share.dim}) does not fit "
                              f"{list(target.shape)} {target.dtype}")
    try:
        shard.read_slice_into(name, buf, share.dim, share.ranges)
    except (SafetensorsFormatError, OSError) as e:
        raise CheckpointError(f"{shard.path}: tensor {name!r} cannot be read: {e}") from None
    if share.dim == 0 and size < rows:         # the last rank's vocabulary rows, padded with zeros
        target[size:].zero_()
        target[:size].copy_(buf)
    else:
        target.copy_(buf)


def _rule_for(model: torch.nn.Module, name: str) -> str | None:
    module_name, _, tensor_name = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    return getattr(module, "TENSOR_RULES", {}).get(tensor_name)


def _progress(total: int, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="Loading weights", unit="tensor", leave=False)


def load_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    strict: bool = False,
    progress: bool | None = None,
    layout=None,
    tp=None,
) -> NemotronHForCausalLM:
    """Load a NemotronH checkpoint in the Hugging Face layout from a local directory.

    dtype: "auto" (the checkpoint's torch_dtype), "float32", "bfloat16" or "float16"; quantized weights
    (NVFP4, FP8) stay packed whatever dtype says. strict: unexpected tensors are an error, not a warning.
    layout (nemoh.distributed.ParallelLayout) and tp (its TPGroup): load one tensor-parallel rank's share only,
    reading just its slices of each tensor.
    """
    model_dir = os.fspath(path)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: not a local model directory (nemoh never downloads weights)")
    config = NemotronHConfig.from_pretrained(model_dir)
    target_dtype = resolve_dtype(dtype, config)
    device = torch.device(device)
    tensors = shard_map(model_dir)
    if layout is not None and not layout.is_parallel:
        layout = None
    model = _build_model(config, model_dir, target_dtype, device, layout, tp)
    if layout is not None:
        from nemoh.distributed.sharding import tensor_slice

    expected = dict(model.named_parameters())
    expected.update(dict(model.named_buffers()))
    # transformers' NemotronH never ties (`_tied_weights_keys = {}`): a stored lm_head.weight is the head even
    # when the config says tie_word_embeddings. The embeddings stand in for it only when the files have none.
    tie = config.tie_word_embeddings and "lm_head.weight" not in tensors
    if tie:
        expected.pop("lm_head.weight", None)
    elif config.tie_word_embeddings:
        logger.info("%s: tie_word_embeddings is true but the checkpoint stores lm_head.weight; using the stored "
                    "head, as transformers does", model_dir)
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, file in tensors.items():
        by_file[file].append(name)

    loaded, unexpected = set(), []
    bar = _progress(len(tensors), progress)
    with torch.no_grad():
        for file, names in by_file.items():
            shard = _open(file)
            present = set(shard.tensors)
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{file}: tensor {name!r} is listed in the index but not in this shard")
                share = None if layout is None else tensor_slice(name, shard.tensors[name].shape, config, layout)
                if share is not None and share.skip:
                    pass                                       # another rank's expert
                elif share is not None and share.target in expected and (share.dim is not None or share.zero):
                    _read_share(expected[share.target], shard, name, share)
                    loaded.add(share.target)
                elif share is not None and share.target in expected:
                    _check_and_copy(expected[share.target], shard, name, _rule_for(model, share.target))
                    loaded.add(share.target)
                elif name in expected:
                    _check_and_copy(expected[name], shard, name, _rule_for(model, name))
                    loaded.add(name)
                elif (m := KV_SCALE_RE.match(name)) and m.group(2) == m.group(3):
                    layer = int(m.group(1)) + (config.num_hidden_layers if name.startswith("mtp.") else 0)
                    k, v = model.kv_scales.get(layer, (1.0, 1.0))
                    value = float(shard.read(name).float().reshape(-1)[0])
                    model.kv_scales[layer] = (value, v) if m.group(2) == "k" else (k, value)
                elif name.startswith("mtp.") and model.mtp is None:
                    pass  # present in the file but not used by this configuration: harmless
                else:
                    unexpected.append(f"{name} (in {os.path.basename(file)})")
                if bar is not None:
                    bar.update(1)
            shard.close()
    if bar is not None:
        bar.close()

    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        where = os.path.join(model_dir, INDEX_FILE if os.path.isfile(os.path.join(model_dir, INDEX_FILE))
                             else SINGLE_FILE)
        rule = _rule_for(model, missing[0])
        raise CheckpointError(f"{where}: missing tensor(s) {shown}" + (f" — rule: {rule}" if rule else ""))
    if unexpected:
        msg = f"{model_dir}: unexpected tensor(s) not used by the model: " + ", ".join(unexpected[:8]) + (
            f", ... ({len(unexpected)} in all)" if len(unexpected) > 8 else "")
        if strict:
            raise CheckpointError(msg)
        logger.warning(msg)
    if tie:
        model.tie_weights()
    model.model_dir = model_dir
    return model.eval()

"""Which modules a ModelOpt checkpoint quantizes, and how: `QuantConfig`.

Read from the checkpoint itself (never guessed from a file name), in either of the two shapes
ModelOpt writes:

* `hf_quant_config.json`: {"producer": {...}, "quantization": {"quant_algo", "group_size",
  "kv_cache_quant_algo", "exclude_modules": [globs], "quantized_layers": {...}}}
* `config.json["quantization_config"]` (ModelOpt's `convert_hf_quant_config_format`):
  {"quant_method": "modelopt", "quant_algo", "ignore": [globs], "kv_cache_scheme":
  {"type": "float", "num_bits": 8, ...}, "config_groups": {...}, "quantized_layers": {...}}.
  vLLM reads `ignore` there and `exclude_modules` in hf_quant_config.json; both keys are accepted
  in both places, as is `kv_cache_quant_algo`.

When both files exist, config.json's values win key by key (vLLM prefers it too) and
hf_quant_config.json fills in what config.json lacks; two different quant_algo values are an error.

quant_algo: NVFP4 (W4A4 on Blackwell; weight-only here), W4A16_NVFP4 (ModelOpt's weight-only NVFP4,
no input_scale), FP8 (per-tensor), MIXED_PRECISION (per-module `quantized_layers: {module:
{quant_algo, group_size?}}`; modules absent from it stay unquantized).

Exclusions: ModelOpt writes fnmatch wildcards, typically a module path with a trailing `*`
(`lm_head`, `backbone.layers.1.mixer.gate*`, `*mtp*`). A pattern excludes a module when it matches
the module's name or any parent of it (so `mtp` and `mtp*` both exclude `mtp.layers.0.eh_proj`).
Names and patterns are compared both as written and with a leading `backbone.`/`model.` removed,
so `model.layers.3.mixer.in_proj` and `backbone.layers.3.mixer.in_proj` name the same module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

Scheme = Literal["nvfp4", "fp8"]

# quant_algo -> weight scheme nemoh runs it with (weight-only dequantisation for all of them).
ALGO_SCHEMES: dict[str, Scheme] = {"NVFP4": "nvfp4", "W4A16_NVFP4": "nvfp4", "FP8": "fp8"}
SUPPORTED_ALGOS = (*ALGO_SCHEMES, "MIXED_PRECISION")
ACTIVATION_SCALE_ALGOS = ("NVFP4", "FP8")
SUPPORTED_KV_CACHE_ALGOS = ("FP8",)
NVFP4_GROUP_SIZE = 16
_ROOT_PREFIXES = ("backbone.", "model.")


def strip_root(name: str) -> str:
    for prefix in _ROOT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


@dataclass
class QuantConfig:
    quant_algo: str
    group_size: int | None = NVFP4_GROUP_SIZE
    kv_cache_quant_algo: str | None = None
    exclude_modules: list[str] = field(default_factory=list)
    quantized_layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    producer: dict[str, Any] | None = None
    source: str = "quantization config"  # where it was read from, for error messages

    def __post_init__(self) -> None:
        if isinstance(self.quant_algo, str):
            self.quant_algo = self.quant_algo.upper()
        if isinstance(self.kv_cache_quant_algo, str):
            self.kv_cache_quant_algo = self.kv_cache_quant_algo.upper()
        validate_quant_config(self)
        if self.group_size is None:
            self.group_size = NVFP4_GROUP_SIZE
        # MIXED_PRECISION lookup table keyed by the name without its backbone./model. root.
        self._layer_algos: dict[str, str] = {}
        if self.quant_algo == "MIXED_PRECISION":
            self._layer_algos = {
                strip_root(name): str(entry["quant_algo"]).upper() for name, entry in self.quantized_layers.items()
            }
        self._patterns = [(p, strip_root(p)) for p in self.exclude_modules]

    # --- reading -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "quantization config") -> QuantConfig:
        """Parse either shape: hf_quant_config.json (has "quantization") or config.json's block."""
        if not isinstance(cfg, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        if "quantization" in cfg:
            body = cfg["quantization"]
            if not isinstance(body, dict):
                raise ValueError(f"{source}: 'quantization' must be an object")
            producer = cfg.get("producer")
        else:
            body = cfg
            producer = cfg.get("producer")
            method = cfg.get("quant_method")
            if method is not None and not str(method).lower().startswith("modelopt"):
                raise ValueError(
                    f"{source}: quant_method {method!r} is not supported; nemoh reads ModelOpt "
                    "checkpoints (quant_method 'modelopt')"
                )
        return cls(**_fields_from_body(body, source), producer=producer, source=source)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> QuantConfig | None:
        """The checkpoint's quantization config, or None for an unquantized checkpoint."""
        model_dir = Path(model_dir)
        parts: list[tuple[str, dict[str, Any]]] = []  # (source, fields), highest priority first
        config_path = model_dir / "config.json"
        if config_path.is_file():
            qc = json.loads(config_path.read_text()).get("quantization_config")
            if qc is not None:
                source = f"{config_path}: quantization_config"
                if not isinstance(qc, dict):
                    raise ValueError(f"{source}: expected an object")
                method = qc.get("quant_method")
                if method is None or not str(method).lower().startswith("modelopt"):
                    raise ValueError(
                        f"{source}: quant_method {method!r} is not supported; nemoh reads ModelOpt "
                        "checkpoints (quant_method 'modelopt')"
                    )
                parts.append((source, {**_fields_from_body(qc, source), "producer": qc.get("producer")}))
        hf_path = model_dir / "hf_quant_config.json"
        if hf_path.is_file():
            hf = json.loads(hf_path.read_text())
            source = str(hf_path)
            body = hf.get("quantization") if isinstance(hf, dict) else None
            if not isinstance(body, dict):
                raise ValueError(f"{source}: expected an object with a 'quantization' object")
            parts.append((source, {**_fields_from_body(body, source), "producer": hf.get("producer")}))
        if not parts:
            return None
        algos = {str(f["quant_algo"]).upper() for _, f in parts if f.get("quant_algo")}
        if len(algos) > 1:
            raise ValueError(
                f"quant_algo disagrees between {parts[0][0]} and {parts[1][0]}: {sorted(algos)}; "
                "a checkpoint must declare one quantization"
            )
        merged: dict[str, Any] = {}
        for _, fields_ in reversed(parts):  # lower priority first, then overwritten
            merged.update({k: v for k, v in fields_.items() if v not in (None, [], {})})
        return cls(**merged, source=" + ".join(s for s, _ in parts))

    # --- queries -------------------------------------------------------------------------------

    def is_excluded(self, module_name: str) -> bool:
        """True when an exclude pattern matches the module or one of its parents."""
        stripped = strip_root(module_name)
        for pattern, pattern_stripped in self._patterns:
            for name, pat in ((module_name, pattern), (stripped, pattern_stripped)):
                if fnmatchcase(name, pat) or fnmatchcase(name, pat + ".*"):
                    return True
        return False

    def algo_for(self, module_name: str) -> str | None:
        """The quant_algo this checkpoint stores `module_name` with (None: unquantized)."""
        if self.is_excluded(module_name):
            return None
        if self.quant_algo == "MIXED_PRECISION":
            return self._layer_algos.get(strip_root(module_name))
        return self.quant_algo

    def scheme_for(self, module_name: str) -> Scheme | None:
        """"nvfp4" | "fp8" for a Linear that this checkpoint stores quantized, else None."""
        algo = self.algo_for(module_name)
        return None if algo is None else ALGO_SCHEMES[algo]

    def has_input_scale(self, module_name: str) -> bool:
        """Whether the checkpoint carries `<module>.input_scale`: ModelOpt writes one for the
        activation-quantizing algos (NVFP4 = W4A4, FP8 = W8A8 static), not for W4A16_NVFP4."""
        return self.algo_for(module_name) in ACTIVATION_SCALE_ALGOS

    def layer_names(self) -> list[str]:
        """MIXED_PRECISION: the module names listed in quantized_layers (as written)."""
        return list(self.quantized_layers)


def _fields_from_body(body: dict[str, Any], source: str) -> dict[str, Any]:
    """Map either shape's keys onto QuantConfig fields (no validation yet)."""
    if "exclude_modules" in body and "ignore" in body and body["exclude_modules"] != body["ignore"]:
        excludes = _as_list(body["exclude_modules"], f"{source}: exclude_modules") + [
            p for p in _as_list(body["ignore"], f"{source}: ignore") if p not in body["exclude_modules"]
        ]
    elif "exclude_modules" in body:
        excludes = _as_list(body["exclude_modules"], f"{source}: exclude_modules")
    else:
        excludes = _as_list(body.get("ignore", []), f"{source}: ignore")
    kv = body.get("kv_cache_quant_algo")
    scheme = body.get("kv_cache_scheme")
    if kv is None and scheme is not None:
        if isinstance(scheme, dict):
            if scheme.get("type") == "float" and scheme.get("num_bits") == 8:
                kv = "FP8"
            else:
                raise ValueError(f"{source}: kv_cache_scheme {scheme} is not supported (nemoh supports FP8 only)")
        else:
            kv = scheme
    group_size = body.get("group_size")
    if group_size is not None:
        try:
            group_size = int(group_size)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: group_size must be an integer, got {group_size!r}") from None
    return {
        "quant_algo": body.get("quant_algo"),
        "group_size": group_size,
        "kv_cache_quant_algo": kv,
        "exclude_modules": excludes,
        "quantized_layers": body.get("quantized_layers") or {},
    }


def _as_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where} must be a list of glob strings, got {value!r}")
    return list(value)


def validate_quant_config(qcfg: QuantConfig) -> None:
    """Raise ValueError naming the key (and module) and the rule it breaks."""
    src = qcfg.source
    if not qcfg.quant_algo:
        raise ValueError(f"{src}: missing quant_algo (one of {', '.join(SUPPORTED_ALGOS)})")
    if qcfg.quant_algo not in SUPPORTED_ALGOS:
        raise ValueError(
            f"{src}: quant_algo {qcfg.quant_algo!r} is not supported; nemoh runs "
            f"{', '.join(SUPPORTED_ALGOS)} (NVFP4 with group_size 16, FP8 per tensor)"
        )
    if qcfg.quant_algo in ("NVFP4", "W4A16_NVFP4") and qcfg.group_size not in (None, NVFP4_GROUP_SIZE):
        raise ValueError(
            f"{src}: group_size {qcfg.group_size} is not allowed for {qcfg.quant_algo}; NVFP4 uses one "
            f"FP8 scale per {NVFP4_GROUP_SIZE} inputs (group_size {NVFP4_GROUP_SIZE})"
        )
    if qcfg.kv_cache_quant_algo is not None and qcfg.kv_cache_quant_algo not in SUPPORTED_KV_CACHE_ALGOS:
        raise ValueError(
            f"{src}: kv_cache_quant_algo {qcfg.kv_cache_quant_algo!r} is not supported; "
            "nemoh supports FP8 or null"
        )
    _as_list(qcfg.exclude_modules, f"{src}: exclude_modules")
    if qcfg.quant_algo == "MIXED_PRECISION":
        if not isinstance(qcfg.quantized_layers, dict) or not qcfg.quantized_layers:
            raise ValueError(
                f"{src}: MIXED_PRECISION requires a non-empty quantized_layers mapping "
                "{module: {quant_algo, group_size?}}"
            )
        for name, entry in qcfg.quantized_layers.items():
            where = f"{src}: quantized_layers[{name!r}]"
            if not isinstance(entry, dict) or "quant_algo" not in entry:
                raise ValueError(f"{where} must be an object with a quant_algo, got {entry!r}")
            algo = str(entry["quant_algo"]).upper()
            if algo not in ALGO_SCHEMES:
                raise ValueError(
                    f"{where}: quant_algo {entry['quant_algo']!r} is not supported per layer; "
                    f"use one of {', '.join(ALGO_SCHEMES)}"
                )
            gs = entry.get("group_size")
            if ALGO_SCHEMES[algo] == "nvfp4" and gs is not None and gs != NVFP4_GROUP_SIZE:
                raise ValueError(
                    f"{where}: group_size {gs} is not allowed for {algo}; NVFP4 uses one FP8 scale "
                    f"per {NVFP4_GROUP_SIZE} inputs (group_size {NVFP4_GROUP_SIZE})"
                )

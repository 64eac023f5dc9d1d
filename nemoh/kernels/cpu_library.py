"""Loading nemoh's native CPU kernels (`nemoh/kernels/cpu/`, built by `pip install`) and their C ABI.

The library is plain C++ with no PyTorch headers, so it builds with the system compiler against any torch
version; it is called through ctypes with tensors' data pointers. Each kernel takes one pointer to an argument
struct (mirrored here field for field from `cpu/nemoh_cpu.h`), so that a step can be replayed as one list of
(kernel, arguments) pairs (`run_plan`) without Python between the kernels.

`library()` returns None, after one logged line saying why, when the library was not built, the CPU lacks
AVX2 / FMA / F16C (x86), or `NEMOH_CPU_KERNELS=0`; every caller then takes its PyTorch reference path.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ABI_VERSION = 1
FORMAT_F32, FORMAT_BF16, FORMAT_F16, FORMAT_FP8, FORMAT_NVFP4 = range(5)
PANELS = 0x100             # a format | PANELS: the weight re-laid in panels of 16 features (nemoh_cpu.h)
STORE, RELU2, ADD = range(3)
PER_SEQUENCE = -1          # a kernel's `rows`: one row per sequence of the step
DTYPE_FORMATS = {torch.float32: FORMAT_F32, torch.bfloat16: FORMAT_BF16, torch.float16: FORMAT_F16,
                 torch.float8_e4m3fn: FORMAT_FP8}

c_int32, c_int64, c_float, c_void_p = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class StepShape(ctypes.Structure):
    _fields_ = [("num_rows", c_int64), ("num_seqs", c_int64)]


class Weight(ctypes.Structure):
    _fields_ = [("format", c_int32), ("_pad", c_int32), ("n", c_int64), ("k", c_int64), ("data", c_void_p),
                ("block_scale", c_void_p), ("scale", c_float), ("_pad2", c_int32), ("bias", c_void_p),
                ("plain_data", c_void_p), ("plain_block_scale", c_void_p)]


ROUND_NONE, ROUND_BF16, ROUND_F16 = range(3)
ROUNDING = {torch.float32: ROUND_NONE, torch.bfloat16: ROUND_BF16, torch.float16: ROUND_F16}


def _struct(name: str, fields: list[tuple[str, type]]) -> type[ctypes.Structure]:
    return type(name, (ctypes.Structure,), {"_fields_": fields})


P, I64, I32, F32 = c_void_p, c_int64, c_int32, c_float
LinearArgs = _struct("LinearArgs", [
    ("shape", P), ("rows", I64), ("x", P), ("x_stride", I64), ("y", P), ("y_stride", I64), ("w", Weight),
    ("epilogue", I32), ("round", I32)])
EmbedArgs = _struct("EmbedArgs", [
    ("shape", P), ("rows", I64), ("ids", P), ("table", P), ("table_format", I32), ("_pad", I32),
    ("hidden", I64), ("x", P), ("x_stride", I64)])
RMSNormArgs = _struct("RMSNormArgs", [
    ("shape", P), ("rows", I64), ("x", P), ("x_stride", I64), ("y", P), ("y_stride", I64), ("weight", P),
    ("hidden", I64), ("eps", F32), ("round", I32)])
AddArgs = _struct("AddArgs", [
    ("shape", P), ("rows", I64), ("x", P), ("x_stride", I64), ("a", P), ("a_stride", I64), ("width", I64),
    ("round", I32), ("_pad", I32)])
GatherRowsArgs = _struct("GatherRowsArgs", [
    ("shape", P), ("count", I64), ("idx", P), ("x", P), ("x_stride", I64), ("y", P), ("y_stride", I64),
    ("width", I64)])
ArgmaxArgs = _struct("ArgmaxArgs", [
    ("shape", P), ("rows", I64), ("logits", P), ("stride", I64), ("vocab", I64), ("out", P)])
RouteArgs = _struct("RouteArgs", [
    ("shape", P), ("rows", I64), ("logits", P), ("logits_stride", I64), ("bias", P), ("num_experts", I64),
    ("top_k", I64), ("n_group", I64), ("topk_group", I64), ("norm_topk", I32), ("scaling", F32), ("ids", P),
    ("weights", P)])
ExpertsArgs = _struct("ExpertsArgs", [
    ("shape", P), ("rows", I64), ("u", P), ("u_stride", I64), ("ids", P), ("weights", P), ("top_k", I64),
    ("up", P), ("down", P), ("num_experts", I64), ("out", P), ("out_stride", I64), ("round", I32),
    ("_pad", I32)])
MambaArgs = _struct("MambaArgs", [
    ("shape", P), ("q", I64), ("proj", P), ("proj_stride", I64), ("slots", P), ("conv_cache", P),
    ("conv_format", I32), ("ssm_format", I32), ("ssm_cache", P), ("conv_weight", P), ("conv_bias", P),
    ("dt_bias", P), ("A", P), ("D", P), ("norm_weight", P), ("num_heads", I64), ("head_dim", I64),
    ("n_groups", I64), ("state_size", I64), ("conv_kernel", I64), ("dt_min", F32), ("dt_max", F32),
    ("eps", F32), ("round", I32), ("xbc", P), ("y", P), ("y_stride", I64), ("saved_conv", P), ("saved_ssm", P)])
AttentionArgs = _struct("AttentionArgs", [
    ("shape", P), ("q", I64), ("qkv", P), ("qkv_stride", I64), ("positions", P), ("slot_mapping", P),
    ("block_tables", P), ("max_blocks", I64), ("k_cache", P), ("v_cache", P), ("cache_format", I32),
    ("k_scale", F32), ("v_scale", F32), ("block_size", I64), ("num_heads", I64), ("num_kv_heads", I64),
    ("head_dim", I64), ("sm_scale", F32), ("round", I32), ("out", P), ("out_stride", I64)])


class PlanEntry(ctypes.Structure):
    _fields_ = [("fn", c_void_p), ("args", c_void_p)]


# In the order nemoh_struct_sizes reports them: a test checks that every mirror has the C struct's size.
STRUCTS = ("StepShape", "Weight", "LinearArgs", "EmbedArgs", "RMSNormArgs", "AddArgs", "GatherRowsArgs",
           "ArgmaxArgs", "RouteArgs", "ExpertsArgs", "MambaArgs", "AttentionArgs", "PlanEntry")
KERNELS = ("nemoh_linear", "nemoh_embed", "nemoh_rmsnorm", "nemoh_add", "nemoh_gather_rows", "nemoh_argmax",
           "nemoh_route", "nemoh_experts", "nemoh_mamba", "nemoh_attention")


class CpuLibrary:
    """The loaded library: kernel entry points by name (`fn`) and as raw addresses for plans (`address`)."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        if self.lib.nemoh_abi_version() != ABI_VERSION:
            raise OSError(f"{path.name} speaks ABI {self.lib.nemoh_abi_version()}, this nemoh {ABI_VERSION}: "
                          "rebuild it (pip install -e .)")
        self.fn = {name: getattr(self.lib, name) for name in KERNELS}
        for f in self.fn.values():
            f.argtypes, f.restype = [c_void_p], None
        self.address = {name: ctypes.cast(f, c_void_p).value for name, f in self.fn.items()}
        self.lib.nemoh_run_plan.argtypes, self.lib.nemoh_run_plan.restype = [c_void_p, c_int64], None
        self.lib.nemoh_run_plan_timed.argtypes = [c_void_p, c_int64, c_void_p]
        self.lib.nemoh_run_plan_timed.restype = None
        self.lib.nemoh_set_num_threads.argtypes = [c_int32]
        self.lib.nemoh_struct_sizes.argtypes, self.lib.nemoh_struct_sizes.restype = [c_void_p, c_int64], c_int64
        self.lib.nemoh_panel_bytes.argtypes, self.lib.nemoh_panel_bytes.restype = [c_void_p, c_void_p], c_int64
        self.lib.nemoh_pack_panels.argtypes, self.lib.nemoh_pack_panels.restype = [c_void_p, c_void_p, c_void_p], None
        self.threads = 0

    def struct_sizes(self) -> list[int]:
        """sizeof of each of STRUCTS as the library was compiled."""
        out = (c_int64 * len(STRUCTS))()
        count = self.lib.nemoh_struct_sizes(out, len(STRUCTS))
        return list(out)[:count]

    def pack_panels(self, w: Weight) -> tuple[Weight, tuple[torch.Tensor, ...]]:
        """The weight `w` describes (plain layout) re-laid in panels: (its descriptor, the tensors holding it)."""
        scale_bytes = c_int64(0)
        size = self.lib.nemoh_panel_bytes(ctypes.byref(w), ctypes.byref(scale_bytes))
        data = torch.empty(size, dtype=torch.uint8)
        scales = torch.empty(max(1, scale_bytes.value), dtype=torch.uint8)
        self.lib.nemoh_pack_panels(ctypes.byref(w), data.data_ptr(), scales.data_ptr())
        packed = Weight(format=w.format | PANELS, n=w.n, k=w.k, data=data.data_ptr(),
                        block_scale=scales.data_ptr() if scale_bytes.value else None, scale=w.scale, bias=w.bias,
                        plain_data=w.data, plain_block_scale=w.block_scale)
        return packed, (data, scales)

    def sync_threads(self) -> None:
        """Use as many threads as PyTorch does (torch.set_num_threads)."""
        n = torch.get_num_threads()
        if n != self.threads:
            self.lib.nemoh_set_num_threads(n)
            self.threads = n

    def call(self, name: str, args: ctypes.Structure) -> None:
        self.sync_threads()
        self.fn[name](ctypes.byref(args))

    def run_plan(self, entries: ctypes.Array, count: int, profile: torch.Tensor | None = None) -> None:
        """Run the first `count` entries; with `profile` (int64, one per entry) add each one's nanoseconds."""
        self.sync_threads()
        if profile is None:
            self.lib.nemoh_run_plan(entries, count)
        else:
            self.lib.nemoh_run_plan_timed(entries, count, profile.data_ptr())

    def kernel_name(self, address: int) -> str:
        return next(name for name, a in self.address.items() if a == address)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _find_library() -> Path | None:
    here = Path(__file__).resolve().parent
    found = sorted(here.glob("_cpu*.so")) + sorted(here.glob("_cpu*.pyd"))
    return found[0] if found else None


@functools.cache
def library() -> CpuLibrary | None:
    """The native CPU kernels, or None (logged once) when they cannot be used here."""
    if os.environ.get("NEMOH_CPU_KERNELS", "1") == "0":
        logger.info("nemoh native CPU kernels: off (NEMOH_CPU_KERNELS=0); using the PyTorch paths")
        return None
    path = _find_library()
    if path is None:
        logger.warning("nemoh native CPU kernels: not built (no C++ compiler at install time?); using the slower "
                       "PyTorch paths. Install g++ and reinstall nemoh (pip install -e .) for the fast path")
        return None
    if platform.machine().lower() in ("x86_64", "amd64"):
        missing = {"avx2", "fma", "f16c"} - _cpu_flags()
        if missing:
            logger.warning("nemoh native CPU kernels: this CPU lacks %s; using the PyTorch paths",
                           ", ".join(sorted(missing)))
            return None
    try:
        return CpuLibrary(path)
    except (OSError, AttributeError) as e:
        logger.warning("nemoh native CPU kernels: cannot load %s (%s); using the PyTorch paths", path.name, e)
        return None


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()

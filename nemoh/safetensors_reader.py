"""A minimal safetensors reader that reads each tensor straight into its destination.

Going through the format by hand (8-byte header length, JSON header, raw little-endian data) lets the loader
`readinto` a parameter's own memory, so loading needs no second copy of the weights and no memory map whose
pages would count as resident, and lets every error name the file and tensor. The format holds only raw
tensors: nothing in it can execute code.
"""
from __future__ import annotations

import ctypes
import json
import os
import struct

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFormatError(ValueError):
    pass


class TensorInfo:
    __slots__ = ("name", "dtype", "shape", "start", "end")

    def __init__(self, name: str, dtype: torch.dtype, shape: list[int], start: int, end: int):
        self.name, self.dtype, self.shape, self.start, self.end = name, dtype, shape, start, end


def _writable_bytes(t: torch.Tensor) -> memoryview:
    """The memory of the contiguous CPU tensor `t` as a writable buffer for `readinto`. A tensor has no buffer
    interface of its own, and `t.numpy()` would make numpy a dependency of loading (torch does not need it)."""
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


class SafetensorsFile:
    """Open one shard: `.tensors` describes every tensor; `read_into` / `read` fetch one."""

    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "rb")
        size = os.fstat(self.file.fileno()).st_size
        try:
            raw = self.file.read(8)
            if len(raw) < 8:
                raise SafetensorsFormatError("file is shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise SafetensorsFormatError(f"header length {header_len} exceeds the file ({size} bytes)")
            header = json.loads(self.file.read(header_len))
            if not isinstance(header, dict):
                raise SafetensorsFormatError("header is not a JSON object")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.file.close()
            raise SafetensorsFormatError(f"header is not valid JSON ({e})") from None
        except SafetensorsFormatError:
            self.file.close()
            raise
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        self.tensors: dict[str, TensorInfo] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = [int(d) for d in info["shape"]]
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                self.file.close()
                raise SafetensorsFormatError(f"tensor {name!r}: malformed header entry {info!r}") from None
            numel = 1
            for d in shape:
                numel *= d
            if end - start != numel * dtype.itemsize or start < 0:
                self.file.close()
                raise SafetensorsFormatError(f"tensor {name!r}: data offsets {start}..{end} do not match "
                                             f"shape {shape} of {info['dtype']}")
            if self.data_start + end > size:
                self.file.close()
                raise SafetensorsFormatError(f"tensor {name!r}: data ends at byte {self.data_start + end} but "
                                             f"the file has {size} bytes (truncated)")
            self.tensors[name] = TensorInfo(name, dtype, shape, start, end)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill the contiguous CPU tensor `out` (same dtype and element count) with the tensor's bytes."""
        info = self.tensors[name]
        self.file.seek(self.data_start + info.start)
        if self.file.readinto(_writable_bytes(out)) != info.end - info.start:
            raise SafetensorsFormatError(f"tensor {name!r}: short read (truncated file)")

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        self.read_into(name, out)
        return out

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

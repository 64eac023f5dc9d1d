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

    def read_slice_into(self, name: str, out: torch.Tensor, dim: int, ranges: list[tuple[int, int]],
                        chunk_bytes: int = 8 << 20) -> None:
        """Fill the contiguous CPU tensor `out` (same dtype) with rows (dim 0) or columns (dim 1, 2-D tensors)
        [start, stop) of each range, concatenated: a tensor-parallel rank's share, read without the rest of the
        tensor ever being in memory (columns go through a buffer of at most `chunk_bytes` of whole rows)."""
        info = self.tensors[name]
        row_bytes = info.dtype.itemsize
        for d in info.shape[1:]:
            row_bytes *= d
        base = self.data_start + info.start
        if dim == 0:
            offset = 0
            for start, stop in ranges:
                part = out.narrow(0, offset, stop - start)
                self.file.seek(base + start * row_bytes)
                if self.file.readinto(_writable_bytes(part)) != (stop - start) * row_bytes:
                    raise SafetensorsFormatError(f"tensor {name!r}: short read (truncated file)")
                offset += stop - start
            return
        if dim != 1 or len(info.shape) != 2:
            raise ValueError(f"tensor {name!r}: column slices are read from 2-D tensors only")
        num_rows = info.shape[0]
        step = max(1, chunk_bytes // max(row_bytes, 1))
        buf = torch.empty(min(step, num_rows), info.shape[1], dtype=info.dtype)
        for r0 in range(0, num_rows, step):
            n = min(step, num_rows - r0)
            self.file.seek(base + r0 * row_bytes)
            if self.file.readinto(_writable_bytes(buf[:n])) != n * row_bytes:
                raise SafetensorsFormatError(f"tensor {name!r}: short read (truncated file)")
            out[r0:r0 + n] = torch.cat([buf[:n, a:b] for a, b in ranges], dim=1)

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

"""Peak transient memory of a piece of PyTorch work, counted tensor by tensor (any device, the CPU included).

`TensorMemoryTracker` is a TorchDispatchMode: every tensor an operator returns whose storage is new (not one of
the operator's inputs' storages: a view or an in-place result is not an allocation) adds its storage's bytes to
the live total until the last tensor on that storage is gone; `peak_bytes` is the highest total seen. Tensors
that existed before the block (weights, caches) count nothing, so the figure is what the work allocates on top
of them: activations, gathered keys, score tiles, saved states. Scratch memory inside one operator (a fused
kernel's workspace, the native CPU kernels' thread buffers) is not seen; CUDA has `torch.cuda.max_memory_allocated`
for the whole figure.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemoryTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._storages: dict[int, list[int]] = {}          # data_ptr -> [nbytes, tensors alive on it]

    def _release(self, ptr: int) -> None:
        entry = self._storages.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self._storages[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {s.data_ptr() for s in map(_storage, tree_flatten((args, kwargs))[0]) if s is not None}
        for t in tree_flatten(out)[0]:
            storage = _storage(t)
            if storage is None:
                continue
            ptr = storage.data_ptr()
            if ptr == 0:
                continue
            if ptr in self._storages:
                self._storages[ptr][1] += 1
            elif ptr in inputs:
                continue                       # a view of, or an in-place write to, memory that existed before
            else:
                self._storages[ptr] = [storage.nbytes(), 1]
                self.live_bytes += storage.nbytes()
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(t, self._release, ptr)
        return out


def _storage(t) -> torch.UntypedStorage | None:
    """A tensor's storage; None for what is not a tensor, a meta tensor or an opaque one (oneDNN's packed
    weights: resident copies the plan counts apart, made once, not step transients)."""
    if not isinstance(t, torch.Tensor) or t.is_meta or t.is_mkldnn:
        return None
    try:
        return t.untyped_storage()
    except (NotImplementedError, RuntimeError):
        return None

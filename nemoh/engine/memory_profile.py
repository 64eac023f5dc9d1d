"""Peak transient memory: measured at start-up by a profiling step (`profile_steps`), or counted tensor by tensor.

`profile_steps` (as vLLM's profile_run): before the caches are sized, the engine runs dummy steps at the largest
admitted shapes (prefill chunks of max_num_batched_tokens, fresh and over cached context, with the MTP draft over
them; a verification of
max_num_seqs x (1 + k) rows keeping its per-position Mamba states, or a decode of max_num_seqs rows) over small
temporary caches, and measures the peak memory they add: `torch.cuda.max_memory_allocated` on CUDA; on a CPU the
resident-set high-water mark (VmHWM, reset by writing "5" to /proc/self/clear_refs), which also sees allocator
slack, native kernels' scratch and the code the first step pages in. The CPU's panel / packed weight copies made
by the first products are resident, counted apart by the plan, and subtracted. The memory plan sizes the caches
from what is left after the measured figure.


`TensorMemoryTracker` is a TorchDispatchMode: every tensor an operator returns whose storage is new (not one of
the operator's inputs' storages: a view or an in-place result is not an allocation) adds its storage's bytes to
the live total until the last tensor on that storage is gone; `peak_bytes` is the highest total seen. Tensors
that existed before the block (weights, caches) count nothing, so the figure is what the work allocates on top
of them: activations, gathered keys, score tiles, saved states. Scratch memory inside one operator (a fused
kernel's workspace, the native CPU kernels' thread buffers) is not seen; CUDA has `torch.cuda.max_memory_allocated`
for the whole figure.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from nemoh.models.forward_context import ForwardContext

logger = logging.getLogger(__name__)


@dataclass
class StepProfile:
    """What the start-up profiling step measured."""
    peak_bytes: int             # peak transient memory of the profiled steps, above the weights and caches
    method: str                 # how it was measured
    shapes: list[str]           # the steps that ran
    seconds: float
    # CPU: the process's VmHWM before the reset and at the end of the profiling step, the larger of the two
    # (writing to clear_refs forgets the earlier high-water mark: whoever reads VmHWM later takes this into account)
    rss_high_water: int | None = None


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        lib = None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


_LIBC = _libc()


def release_free_memory() -> None:
    """Give the C allocator's free pages back to the system (glibc `malloc_trim`): after start-up, the freed
    activations of the profiling step would otherwise stay resident until the first real step reuses them."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def resident_copies_bytes(model: torch.nn.Module) -> int:
    """Bytes of the CPU weight copies made on first use (native panel layouts, oneDNN packed weights) so far."""
    from nemoh.models.linear import packed_copies

    total = 0
    for m in model.modules():
        panels = getattr(m, "_nemoh_panels", None)
        if panels is not None:
            total += sum(t.numel() * t.element_size() for t in panels[2])
    for packed in packed_copies(model):
        if packed.packed is not None and packed.key is not None:
            shape, dtype = packed.key[2], packed.key[4]
            total += shape.numel() * dtype.itemsize
    return total


def captured_step_bytes(captured, runner) -> int:
    """Bytes of the buffers a captured-step object holds (its plans' input, activation and output buffers, the
    saved per-position Mamba states of a verification, small float32 copies of norms and routers), each storage
    once, without the model's weights, the CPU panel copies (the plan counts those apart) and the caches."""
    exclude = {t.untyped_storage().data_ptr() for t in list(runner.model.parameters()) + list(runner.model.buffers())}
    for m in runner.model.modules():
        panels = getattr(m, "_nemoh_panels", None)
        if panels is not None:
            exclude.update(t.untyped_storage().data_ptr() for t in panels[2])
    for caches in (runner.kv_caches, runner.mamba_caches, runner.verify_states or {}):
        exclude.update(t.untyped_storage().data_ptr() for pair in caches.values() for t in pair)
    seen_ids, seen_ptrs, total, stack = {id(runner)}, set(), 0, [captured]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_ids:
            continue
        seen_ids.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = _storage(obj)
            ptr = storage.data_ptr() if storage is not None else 0
            if ptr and ptr not in exclude and ptr not in seen_ptrs:
                seen_ptrs.add(ptr)
                total += storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif type(obj).__module__.startswith("nemoh.") and not isinstance(obj, torch.nn.Module):
            stack.extend(getattr(obj, "__dict__", {}).values())
            stack.extend(getattr(obj, name) for name in getattr(type(obj), "__slots__", ()) if hasattr(obj, name))
    return total


def _context(runner, kv, mamba, starts: list[int], lens: list[int], tables: list[list[int]], slots: list[int],
             save: bool, verify_states: dict | None = None) -> ForwardContext:
    bs = runner.block_size
    flat = [t[p // bs] * bs + p % bs for t, s, n in zip(tables, starts, lens) for p in range(s, s + n)]
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    return ForwardContext(query_start_loc=qsl, context_lens=list(starts), state_slots=list(slots),
                          block_tables=tables, slot_mapping=torch.tensor(flat, dtype=torch.long, device=runner.device),
                          block_size=bs, kv_caches=kv, mamba_caches=mamba, save_intermediate_states=save,
                          verify_states=verify_states, reference_attention=runner.args.enforce_eager)


def _run_shapes(runner, kv, mamba, verify_states, k: int, T: int, S: int) -> list[str]:
    """The dummy steps: what the engine's largest steps allocate (see the module docstring)."""
    model, device, bs = runner.model, runner.device, runner.block_size
    vocab = model.config.vocab_size
    ids = lambda n: torch.arange(20, 20 + n, device=device) % vocab      # noqa: E731
    shapes = []
    # 1. two prefill chunks of T tokens of one sequence, the first one fresh, the second one attending to it (the
    # tiled attention over cached keys: the next chunks' transients do not grow with the context): blocks
    # 0 .. ceil((2T + 2k + 1) / bs) - 1, slot 0
    table = list(range(-(-(2 * T + 2 * k + 1) // bs)))
    for start in (0, T):
        ctx = _context(runner, kv, mamba, [start], [T], [table], [0], False)
        if k:
            hidden = model.forward_hidden(ids(T), ctx)
            logits = model.compute_logits(hidden[[T - 1]])
            mctx = _context(runner, kv, mamba, [start], [T], [table], [0], False)
            h = model.mtp_forward(ids(T), hidden, mctx, [T - 1])
            draft = model.compute_logits(h)
            del hidden, logits, h, draft
        else:
            logits = model.compute_logits(model.forward_hidden(ids(T), ctx, [T - 1]))
            del logits
    shapes.append(f"2 prefill chunks of {T} tokens" + (" + MTP drafts" if k else ""))
    # 2. every sequence at once: S verifications of 1 + k rows (per-position Mamba states kept until the logits
    # are sampled), or S decodes; each sequence has one cached token, its own blocks and slot
    q = 1 + k
    per_seq = -(-(1 + q + k) // bs)
    first = len(table)
    tables = [list(range(first + i * per_seq, first + (i + 1) * per_seq)) for i in range(S)]
    ctx = _context(runner, kv, mamba, [1] * S, [q] * S, tables, list(range(S)), bool(k), verify_states)
    hidden = model.forward_hidden(ids(S * q), ctx)
    logits = model.compute_logits(hidden)
    logits.argmax(-1)
    if k:
        mctx = _context(runner, kv, mamba, [1] * S, [q] * S, tables, list(range(S)), False)
        h = model.mtp_forward(ids(S * q), hidden, mctx, [i * q + q - 1 for i in range(S)])
        model.compute_logits(h)
        del h
    del hidden, logits, ctx
    shapes.append(f"{'verification' if k else 'decode'} of {S} x {q} rows")
    return shapes


def profile_steps(runner, k: int) -> StepProfile:
    """Run the dummy steps over temporary caches and measure their peak memory (see the module docstring)."""
    from nemoh.engine.kv_cache import allocate_kv_caches
    from nemoh.engine.state_cache import allocate_mamba_caches

    args, cfg, device = runner.args, runner.config, runner.device
    T = args.max_num_batched_tokens
    S = max(1, min(args.max_num_seqs, T // (1 + k)))
    bs = runner.block_size
    num_blocks = -(-(2 * T + 2 * k + 1) // bs) + S * -(-(2 + 2 * k) // bs)
    kv = allocate_kv_caches(runner.kv_layer_ids, num_blocks, bs, cfg.num_key_value_heads, cfg.head_dim,
                            runner.kv_dtype, device)
    mamba = allocate_mamba_caches(runner.mamba_layer_ids, S, cfg.mamba_conv_dim, cfg.conv_kernel,
                                  cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, runner.conv_dtype,
                                  runner.ssm_dtype, device)
    # the engine's verifications keep their per-position states in buffers allocated once (the plan counts them
    # as resident): so do these
    verify_states = {i: (c.new_zeros(S, 1 + k, *c.shape[1:]), s.new_zeros(S, 1 + k, *s.shape[1:]))
                     for i, (c, s) in mamba.items()} if k else None
    start = time.perf_counter()
    rss_high_water = None
    gc.collect()
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            shapes = _run_shapes(runner, kv, mamba, verify_states, k, T, S)
            torch.cuda.synchronize(device)
            peak, method = torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
        elif (before := _status_bytes("VmHWM")) is not None and _reset_rss_peak():
            copies = resident_copies_bytes(runner.model)
            base = _status_bytes("VmRSS")
            shapes = _run_shapes(runner, kv, mamba, verify_states, k, T, S)
            made = resident_copies_bytes(runner.model) - copies
            high = _status_bytes("VmHWM")
            peak, method = high - base - made, "resident-set high-water mark (VmHWM)"
            rss_high_water = max(before, high)
        else:       # no /proc/self/clear_refs: the tensors the steps allocate, counted one by one
            with TensorMemoryTracker() as tracker:
                shapes = _run_shapes(runner, kv, mamba, verify_states, k, T, S)
            peak, method = tracker.peak_bytes, "tensor by tensor (no /proc/self/clear_refs)"
    del kv, mamba, verify_states
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        release_free_memory()
    profile = StepProfile(max(0, peak), method, shapes, time.perf_counter() - start, rss_high_water)
    logger.info("nemoh memory profile: %s took at most %.3f GiB above the weights and caches (%s; %.1f s)",
                " and ".join(shapes), profile.peak_bytes / 2 ** 30, method, profile.seconds)
    return profile


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

"""The graph-safe uniform step (`forward_step`) compiles as one graph and never waits on the host.

- `torch.compile(fullgraph=True)` (dynamo with its eager backend: the graph capture is what is checked, no
  code generation) succeeds for the main model and the MTP block, for every layer kind and weight format;
- counted at the dispatcher, a decode step and a verification run no operator that synchronises with the
  host (`aten._local_scalar_dense`, behind `.item()` / `.tolist()` / `bool()`, and the data-dependent-shape
  operators nonzero / masked_select / unique) inside the model forward.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from checkpoints import make_checkpoint
from nemoh import load_model
from nemoh.engine.kv_cache import allocate_kv_caches
from nemoh.engine.state_cache import allocate_mamba_caches
from nemoh.models.forward_context import StepContext
from nemoh.quant.quantize import quantize_checkpoint

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
           "repeat_interleave.Tensor", "bincount"}


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING or str(func).split("aten.")[-1] in SYNCING:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph_safe")
    dense, _ = make_checkpoint(root / "dense")
    out = {"float32": load_model(str(dense), dtype="float32"), "bfloat16": load_model(str(dense), dtype="bfloat16")}
    for fmt in ("nvfp4", "fp8"):
        calib = None
        if fmt == "fp8":
            calib = root / "calib.txt"
            calib.write_text("some words to calibrate with\nand a second line of them")
        quantize_checkpoint(dense, root / fmt, fmt=fmt, calib_file=calib, progress=False)
        out[fmt] = load_model(str(root / fmt), dtype="float32")
    return out


def context(model, num_seqs: int, q: int, save: bool) -> StepContext:
    cfg = model.config
    bs, blocks = 16, 4
    kv_layers = list(cfg.attention_layer_ids) + list(cfg.mtp_attention_layer_ids)
    kv = allocate_kv_caches(kv_layers, num_seqs * blocks, bs, cfg.num_key_value_heads, cfg.head_dim,
                            model.dtype, "cpu")
    mamba = allocate_mamba_caches(cfg.mamba_layer_ids, num_seqs, cfg.mamba_conv_dim, cfg.conv_kernel,
                                  cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, model.dtype,
                                  torch.float32, "cpu")
    positions = torch.tensor([20 + 3 * s + j for s in range(num_seqs) for j in range(q)])
    tables = torch.arange(num_seqs * blocks).view(num_seqs, blocks)
    slot_mapping = torch.stack([tables[r // q, positions[r] // bs] * bs + positions[r] % bs
                                for r in range(num_seqs * q)])
    saved = None
    if save:
        saved = {i: (torch.zeros(num_seqs, q, *c.shape[1:]), torch.zeros(num_seqs, q, *s.shape[1:]))
                 for i, (c, s) in mamba.items()}
    return StepContext(num_seqs, q, positions, slot_mapping, torch.arange(num_seqs), tables, bs, kv, mamba,
                       {}, saved)


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "nvfp4", "fp8"])
@pytest.mark.parametrize("q", [1, 4])
def test_step_has_no_host_sync(models, fmt, q):
    model = models[fmt]
    ctx = context(model, 3, q, save=q > 1)
    ids = torch.randint(3, model.config.vocab_size, (3 * q,))
    counter = CountSyncs()
    with torch.inference_mode(), counter:
        hidden = model.forward_step(ids, ctx)
        model.compute_logits(hidden)
        model.mtp_forward_step(ids, hidden, ctx)
    assert counter.seen == []


def test_the_counter_sees_a_sync():
    counter = CountSyncs()
    with counter:
        torch.ones(3).sum().item()
        torch.arange(4).nonzero()
    assert len(counter.seen) == 2


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "nvfp4", "fp8"])
def test_step_compiles_as_one_graph(models, fmt):
    model = models[fmt]
    torch._dynamo.reset()
    for q in (1, 4):
        ctx = context(model, 2, q, save=q > 1)
        ids = torch.randint(3, model.config.vocab_size, (2 * q,))

        def step(ids, ctx=ctx):
            hidden = model.forward_step(ids, ctx)
            return model.compute_logits(hidden), model.mtp_forward_step(ids, hidden, ctx)

        compiled = torch.compile(step, fullgraph=True, backend="eager")
        with torch.inference_mode():
            logits, _ = compiled(ids)
        assert logits.shape == (2 * q, model.config.vocab_size)


def test_a_step_that_cannot_be_captured_runs_eagerly(tiny_checkpoint, monkeypatch, caplog):
    """A capture that fails (here: inductor raising, as it does without a C++ compiler) leaves one logged line
    naming the cause and an engine that serves from the eager forward, the same tokens."""
    import logging

    from nemoh import LLM
    from nemoh.engine import graph_step
    from nemoh.sampling_params import SamplingParams

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found (set CXX)")

    monkeypatch.setattr(graph_step.torch, "compile", no_compiler)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with caplog.at_level(logging.WARNING, logger="nemoh.engine.captured_step"):
        llm = LLM(str(tiny_checkpoint), dtype="float32", cache_memory_gb=0.05, max_model_len=128,
                  captured_step="inductor")
    lines = [r.getMessage() for r in caplog.records if "captured steps" in r.getMessage()]
    assert len(lines) == 1 and "RuntimeError: no C++ compiler found" in lines[0] and "eager" in lines[0]
    assert llm.engine.runner.captured is None
    got = llm.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids
    eager = LLM(str(tiny_checkpoint), dtype="float32", cache_memory_gb=0.05, max_model_len=128, enforce_eager=True)
    assert got == eager.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids

"""GPU: CUDA-graph replay of the captured steps computes what the eager forward computes.

Skipped without CUDA. On a GPU, tiny checkpoints with every layer kind (dense float32, bfloat16, and an NVFP4
copy) are served twice — the eager forward (`enforce_eager=True`, the reference) and the captured steps
(`captured_step="cuda_graph"`: one CUDA graph per batch bucket, replayed with persistent input buffers) — with
and without MTP speculative decoding (k = 3). Greedy tokens must be identical in float32 and the chosen tokens'
log-probabilities must agree to float32 rounding; in bfloat16 the first tokens must agree.

`NEMOH_GPU_TEST_DEVICE=cpu` runs the same file on a CPU with the graph-safe step run eagerly
(`captured_step="graph_eager"`, what the CUDA graphs capture): it checks the test itself, not the GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from checkpoints import make_checkpoint
from nemoh import LLM
from nemoh.quant.quantize import quantize_checkpoint
from nemoh.sampling_params import SamplingParams

DEVICE = os.environ.get("NEMOH_GPU_TEST_DEVICE", "cuda")
MODE = "cuda_graph" if DEVICE == "cuda" else "graph_eager"
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")
K = 3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    dense, _ = make_checkpoint(root / "dense", num_key_value_heads=2, hybrid_override_pattern="M*EM-E*")
    nvfp4 = root / "nvfp4"
    quantize_checkpoint(dense, nvfp4, fmt="nvfp4", progress=False)
    return {"dense": dense, "nvfp4": nvfp4}


def serve(path, dtype: str, eager: bool, spec) -> list:
    llm = LLM(str(path), dtype=dtype, device=DEVICE, enforce_eager=eager, captured_step=MODE, cache_memory_gb=0.2,
              max_model_len=256, max_num_seqs=8, speculative_config=spec)
    assert (llm.engine.runner.captured is None) == eager
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 4000, (n,), generator=gen).tolist() for n in (7, 30, 12, 45, 3)]
    res = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0))
    return [(r.outputs[0].token_ids, [lp[t].logprob for t, lp in zip(r.outputs[0].token_ids, r.outputs[0].logprobs)])
            for r in res]


@pytest.mark.parametrize("name", ["dense", "nvfp4"])
@pytest.mark.parametrize("spec", [None, {"method": "mtp", "num_speculative_tokens": K}], ids=["plain", "mtp"])
def test_graph_replay_equals_eager_float32(checkpoints, name, spec):
    eager = serve(checkpoints[name], "float32", True, spec)
    replay = serve(checkpoints[name], "float32", False, spec)
    for (tok_e, lp_e), (tok_r, lp_r) in zip(eager, replay):
        assert tok_e == tok_r
        assert max(abs(a - b) for a, b in zip(lp_e, lp_r)) < 1e-4


def test_graph_replay_equals_eager_bfloat16(checkpoints):
    eager = serve(checkpoints["dense"], "bfloat16", True, None)
    replay = serve(checkpoints["dense"], "bfloat16", False, None)
    for (tok_e, _), (tok_r, _) in zip(eager, replay):
        assert tok_e[:4] == tok_r[:4]

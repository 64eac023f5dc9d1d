"""Checkpoints for the tensor-parallel tests: every layer kind, 4 query heads over 1 KV head (fewer KV heads than
ranks), MTP, and NVFP4 / FP8 copies made by `nemoh quantize` (shared expert 64 wide: 32 inputs per rank at TP2,
whole NVFP4 blocks)."""
from __future__ import annotations

import pytest

from checkpoints import make_checkpoint

OVERRIDES = dict(moe_shared_expert_intermediate_size=64)


@pytest.fixture(scope="session")
def tp_checkpoints(tmp_path_factory):
    from nemoh.quant.quantize import quantize_checkpoint

    root = tmp_path_factory.mktemp("tp")
    base, _ = make_checkpoint(root / "f32", **OVERRIDES)
    calib = root / "calib.txt"
    calib.write_text("\n".join(f"my laptop {i} cannot reach the VPN server" for i in range(8)))
    quantize_checkpoint(base, root / "nvfp4", fmt="nvfp4", progress=False)
    quantize_checkpoint(base, root / "fp8", fmt="fp8", calib_file=calib, calib_samples=4, progress=False)
    return {"f32": str(base), "nvfp4": str(root / "nvfp4"), "fp8": str(root / "fp8")}

"""Whether the Triton kernels can be used here: detected once, in this one place, and its absence logged.

Triton is optional (it is not a dependency of nemoh; `pip install nemoh[test]` brings it for the interpreter tests).
The kernel modules (`moe_triton`, `quant_linear_triton`, `quant_triton`) import it unconditionally, so import them
only when `HAVE_TRITON` is true. They run on a CUDA device, or on the CPU under `TRITON_INTERPRET=1` (set before
Triton is first imported), which is how the test suite checks their numerics without a GPU.
"""
from __future__ import annotations

import importlib.util
import logging

logger = logging.getLogger(__name__)

HAVE_TRITON = importlib.util.find_spec("triton") is not None
if not HAVE_TRITON:
    logger.info("triton is not installed: the Triton GPU kernels (nemoh.kernels.*_triton) are unavailable")

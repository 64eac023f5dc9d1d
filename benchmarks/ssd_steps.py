"""The two ways `ssd_steps` (speculative verification's Mamba recurrence) keeps every intermediate state,
timed side by side: all positions at once through a (t x t) decay matrix, against one in-place step per
position. ssd_steps takes the first up to SSD_STEPS_BATCHED_MAX_BYTES of states (all sequences together),
the second above; this
prints what that choice rests on, and checks the two agree.

    python benchmarks/ssd_steps.py [--steps 4] [--batch 1]

Shapes (heads x head dim x state size): the demo model's 8x32x32, then larger ones up to Nemotron 3 Super's
per-layer 128x64x128. Random inputs, float32, warm-up excluded.
"""
from __future__ import annotations

import argparse
import time

import torch

import nemoh.models.ssd as ssd
from nemoh.models.ssd import SSD_STEPS_BATCHED_MAX_BYTES, _sequential_steps

SHAPES = [(8, 32, 32, 2), (16, 32, 32, 2), (8, 64, 64, 1), (16, 64, 64, 2), (128, 64, 128, 8)]


def timed(fn, seconds: float = 0.5) -> float:
    for _ in range(5):
        fn()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        reps += 1
    return (time.perf_counter() - start) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="positions verified at once (k + 1)")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    b, t = args.batch, args.steps
    print(f"{args.batch} sequence(s) x {t} positions, float32, {torch.get_num_threads()} threads; "
          f"ssd_steps batches up to {SSD_STEPS_BATCHED_MAX_BYTES // 1024} KiB of states")
    print(f"{'h x p x n':>14} {'states KiB':>11} {'all at once us':>15} {'step by step us':>16} {'taken':>13}")
    with torch.inference_mode():
        for h, p, n, g in SHAPES:
            torch.manual_seed(0)
            inputs = (torch.randn(b, h, p, n), torch.randn(b, t, h, p), torch.rand(b, t, h) * 0.1,
                      -torch.rand(h) * 4, torch.randn(b, t, g, n), torch.randn(b, t, g, n))
            nbytes = inputs[0].numel() * t * 4
            # the batched form on any size: call it with the limit lifted for this measurement
            limit, ssd.SSD_STEPS_BATCHED_MAX_BYTES = ssd.SSD_STEPS_BATCHED_MAX_BYTES, float("inf")
            try:
                at_once = timed(lambda: ssd.ssd_steps(*inputs))
                y_all, s_all = ssd.ssd_steps(*inputs)
            finally:
                ssd.SSD_STEPS_BATCHED_MAX_BYTES = limit
            stepwise = timed(lambda: _sequential_steps(*inputs))
            y_seq, s_seq = _sequential_steps(*inputs)
            torch.testing.assert_close(y_all, y_seq, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(s_all, s_seq, rtol=1e-4, atol=1e-4)
            taken = "all at once" if nbytes <= SSD_STEPS_BATCHED_MAX_BYTES else "step by step"
            print(f"{f'{h}x{p}x{n}':>14} {nbytes / 1024:11.0f} {at_once * 1e6:15.0f} {stepwise * 1e6:16.0f} "
                  f"{taken:>13}")


if __name__ == "__main__":
    main()

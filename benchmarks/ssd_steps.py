"""The two ways `ssd_steps` (speculative verification's Mamba recurrence) keeps every intermediate state,
timed side by side: all positions at once through a (t x t) decay matrix, against one in-place step per
position. ssd_steps takes the first up to SSD_STEPS_BATCHED_MAX_BYTES of states (all sequences together),
the second above; this
prints what that choice rests on, and checks the two agree. A second table times the output product of one
decode step, y = state C for every (sequence, head), as `ssd_step_` takes it (a batched product of one row,
Cᵀ against the transposed state) against a batched product of the state and one column C, over states
that are not in cache (several copies cycled), for 1 and 32 sequences.

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

    print("\none decode step's output y = state C, us (states cycled through 8 copies, out of cache)")
    print(f"{'sequences x h x p x n':>22} {'state MiB':>9} {'column us':>10} {'row us':>8} {'speed-up':>9}")
    with torch.inference_mode():
        for seqs in (1, 32):
            for h, p, n, _ in SHAPES[:4]:
                states = [torch.randn(seqs * h, p, n) for _ in range(8)]
                c = torch.randn(seqs * h, n, 1)
                turn = iter(range(10 ** 9))
                column = timed(lambda: torch.bmm(states[next(turn) % 8], c))
                row = timed(lambda: torch.bmm(c.transpose(1, 2), states[next(turn) % 8].transpose(1, 2)))
                torch.testing.assert_close(torch.bmm(c.transpose(1, 2), states[0].transpose(1, 2)).transpose(1, 2),
                                           torch.bmm(states[0], c))
                print(f"{f'{seqs} x {h}x{p}x{n}':>22} {states[0].numel() * 4 / 2 ** 20:9.2f} {column * 1e6:10.0f} "
                      f"{row * 1e6:8.0f} {column / row:8.2f}x")


if __name__ == "__main__":
    main()

"""One decode step's sampling, per row (the sampler before batching: process, probs and a multinomial draw
for each row, by the per-row reference in nemoh.engine.sampler) against the batched `Sampler.sample`, for 1 to
64 rows at the demo model's vocabulary 4096 and Nemotron 3's 131072.

    PYTHONPATH=. python benchmarks/sampler_batch.py [--rounds 7] [--threads 2]

Rows cycle through a mix of settings: greedy (with and without a penalty), temperature, top-k, top-p, min-p,
combinations, penalties over a 512-token prompt and 256 generated tokens, min_tokens, and seeded rows. The two
sides alternate over several rounds (these machines are shared and noisy) and the table shows medians; the
calls that check the tokens warm both sides up first. "same tokens" checks that the greedy and seeded rows
of both sides, from the same generator states, draw the same tokens (the unseeded rows' noise is drawn
another way now, see `Sampler._exponential_noise`).
"floor" is one read and write of the (rows, vocab) float32 logits (a clone): the batched path makes a few such
passes (process, temperature, softmax, noise, race), so "x floor" says how far it is from memory-bound.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from nemoh.engine.sampler import Sampler, SamplingRow, _row_probs, _row_process
from nemoh.sampling_params import SamplingParams

SETTINGS = [
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=0, repetition_penalty=1.1),
    SamplingParams(temperature=1.0, top_k=50),
    SamplingParams(temperature=0.8, min_p=0.05, seed=1),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=2),
    SamplingParams(temperature=1.0, frequency_penalty=0.2, presence_penalty=0.1),
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.6, top_p=0.95, min_tokens=300, max_tokens=1000, stop_token_ids=[7]),
]
ROWS = [1, 8, 32, 64]
VOCABS = [4096, 131072]


def make_rows(n: int, vocab: int) -> list[SamplingRow]:
    g = torch.Generator().manual_seed(n)
    rows = []
    for i in range(n):
        p = SETTINGS[i % len(SETTINGS)]
        prompt = torch.randint(0, vocab, (512,), generator=g).tolist()
        output = torch.randint(0, vocab, (256,), generator=g).tolist()
        gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        rows.append(SamplingRow(p, prompt, output, gen))
    return rows


def reseed(sampler: Sampler, rows: list[SamplingRow]) -> None:
    """The same generator states for both sides."""
    sampler.generator.manual_seed(0)
    for row in rows:
        if row.generator is not None:
            row.generator.manual_seed(row.params.seed)


def per_row(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    return [sampler.draw(_row_probs(_row_process(logits[i], row, sampler.eos_token_ids), row.params), row)
            for i, row in enumerate(rows)]


def batched(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    return sampler.sample(logits, rows)


def timed(fn, min_seconds: float = 0.02) -> float:
    """Seconds per call, repeating short calls until min_seconds have passed."""
    reps, start = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, medians of {args.rounds} alternating rounds, times in ms per step")
    print(f"{'vocab':>7} {'rows':>5} {'per row':>9} {'batched':>9} {'speed-up':>9} {'floor':>7} {'x floor':>8} "
          f"{'same tokens':>12}")
    for vocab in VOCABS:
        sampler = Sampler(vocab, eos_token_ids=[2])
        for n in ROWS:
            logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(vocab + n)) * 4
            rows = make_rows(n, vocab)
            fixed = [i for i, row in enumerate(rows) if row.is_greedy or row.generator is not None]
            reseed(sampler, rows)
            old = per_row(sampler, logits, rows)
            reseed(sampler, rows)
            new = batched(sampler, logits, rows)
            same = [new[i] for i in fixed] == [old[i] for i in fixed]
            times: dict[str, list[float]] = {"per row": [], "batched": [], "floor": []}
            for _ in range(args.rounds):
                for name, fn in (("per row", per_row), ("batched", batched)):
                    times[name].append(timed(lambda: fn(sampler, logits, rows)))
                times["floor"].append(timed(logits.clone))
            t = {name: statistics.median(v) * 1e3 for name, v in times.items()}
            print(f"{vocab:>7} {n:>5} {t['per row']:>9.2f} {t['batched']:>9.2f} {t['per row'] / t['batched']:>8.1f}x "
                  f"{t['floor']:>7.2f} {t['batched'] / t['floor']:>7.0f}x {'yes' if same else 'no':>12}")


if __name__ == "__main__":
    main()

"""Long context on this CPU: one long prompt prefilled and decoded by the demo model's engine at
--max-model-len 262144, per prompt length: prefill time, decode time, peak RSS, next to the memory plan.

    python benchmarks/long_context.py [--lengths 8192 16384 32768] [--decode 16] [--dtype bfloat16]
                                      [--needle 32768] [--png docs/long_context.png]

Each length runs in a fresh process (so its peak RSS is its own): RSS after `import nemoh` is the baseline the
plan does not count (the interpreter, torch); the peak is /proc/self/status VmHWM at the end. The plan's
prediction is its resident bytes (weights, CPU copies) + the transients of a step + the caches the engine
allocated (zero-filled, so resident from the start): with max_num_seqs 1 at --max-model-len 262144, one
sequence's 256k tokens of KV blocks and its Mamba slot. The transients are those the engine's start-up profiling
step measured (nemoh.engine.memory_profile; the estimate is printed beside them); that step resets VmHWM, so the
peak is the larger of VmHWM at the end and the high-water mark the profiling step saw.

Needle check (--needle N): the demo model cannot retrieve, so the check reads the logits. Two prompts of N
tokens differ only in their first token, N - 1 positions back; the top-20 logprobs of the next token are
compared. The same prompt twice gives identical logprobs (checked), so any difference is caused by that token,
which reaches the last position only through the cached context (attention over the KV cache; the Mamba
layers' fixed-size state) — proof that the context is read, not cut.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))           # this checkout's nemoh, not an installed one
DEMO = REPO / "nemoh" / "demo" / "model"
GiB = 1024 ** 3


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _prompt(n: int, seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(20, vocab) for _ in range(n)]


def _engine(args, max_model_len: int):
    from nemoh import LLM

    return LLM(str(DEMO), dtype=args.dtype, max_model_len=max_model_len,
               max_num_batched_tokens=args.chunk, max_num_seqs=1)


def child_run(args) -> dict:
    import torch  # noqa: F401  (the baseline: the interpreter, torch and nemoh, imported)

    import nemoh  # noqa: F401
    from nemoh.sampling_params import SamplingParams

    baseline = _status("VmRSS")
    llm = _engine(args, args.max_model_len)
    engine = llm.engine
    n = args.child
    prompt = _prompt(n, 0, engine.model_config.vocab_size)
    engine.add_request("long", prompt, SamplingParams(temperature=0, max_tokens=args.decode, ignore_eos=True))
    start, first, generated = time.perf_counter(), None, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            generated = len(out.outputs[0].token_ids)
            if first is None and generated:
                first = time.perf_counter()
    end = time.perf_counter()
    plan, profile = engine.runner.plan, engine.runner.profile
    # the caches are zero-filled when they are allocated: all of their pages are resident from the start
    predicted = plan.resident_bytes + plan.transient_bytes + engine.runner.cache_bytes
    # the start-up profiling step resets VmHWM (/proc/self/clear_refs) and reports the high-water mark it saw
    peak = max(_status("VmHWM"), (profile.rss_high_water or 0) if profile is not None else 0)
    return {"length": n, "prefill_s": first - start, "decode_s": end - first, "decode_tokens": generated - 1,
            "baseline_rss": baseline, "peak_rss": peak, "plan_bytes": predicted,
            "plan_resident": plan.resident_bytes, "plan_transient": plan.transient_bytes,
            "plan_transient_estimated": plan.estimated_transient_bytes,
            "plan_seq": engine.runner.cache_bytes, "spec_k": plan.num_speculative_tokens}


def child_needle(args) -> dict:
    from nemoh.sampling_params import SamplingParams

    n = args.needle
    llm = _engine(args, max(args.max_model_len, n + 8))
    vocab = llm.engine.model_config.vocab_size
    base = _prompt(n, 1, vocab)
    changed = [(base[0] + 977) % (vocab - 20) + 20] + base[1:]
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=20)
    results = []
    for prompt in (base, base, changed):
        out = llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0]
        results.append({int(t): float(lp.logprob if hasattr(lp, "logprob") else lp)
                        for t, lp in out.logprobs[0].items()})

    def diff(a, b):
        keys = set(a) & set(b)
        return max((abs(a[t] - b[t]) for t in keys), default=float("inf")), len(set(a) ^ set(b))

    same, _ = diff(results[0], results[1])
    moved, swapped = diff(results[0], results[2])
    return {"needle_distance": n - 1, "repeat_max_diff": same, "needle_max_diff": moved,
            "needle_tokens_swapped_in_top20": swapped}


# ---------------------------------------------------------------------------------------------- the plot


def _png(path: Path, width: int, height: int, pixels: bytearray) -> None:
    raw = b"".join(b"\x00" + bytes(pixels[y * width * 3:(y + 1) * width * 3]) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def plot(rows: list[dict], path: Path) -> None:
    """Two panels side by side, x = prompt length (linear): left, peak RSS above the baseline (blue) and the
    plan's prediction (red), GiB; right, prefill seconds (green). No text: docs/long_context.md gives the
    figures; grid lines every 0.5 GiB (left) and every 30 s (right)."""
    W, H, pad = 640, 320, 30
    px = bytearray([255] * W * H * 3)

    def put(x, y, c):
        if 0 <= x < W and 0 <= y < H:
            px[(y * W + x) * 3:(y * W + x) * 3 + 3] = bytes(c)

    def line(x0, y0, x1, y1, c, thick=2):
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            x, y = round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps)
            for dx in range(thick):
                for dy in range(thick):
                    put(x + dx, y + dy, c)

    xs = [r["length"] for r in rows]
    panels = [((0, W // 2), [([(r["peak_rss"] - r["baseline_rss"]) / GiB for r in rows], (30, 90, 200)),
                              ([r["plan_bytes"] / GiB for r in rows], (210, 40, 40))], 0.5),
              ((W // 2, W), [([r["prefill_s"] for r in rows], (30, 150, 60))], 30.0)]
    for (left, right), series, grid in panels:
        top = max(max(v) for v, _ in series) * 1.1 or 1.0
        x0, x1, y0, y1 = left + pad, right - pad // 2, H - pad, pad // 2

        def sx(v):
            return round(x0 + (x1 - x0) * v / max(xs))

        def sy(v):
            return round(y0 - (y0 - y1) * v / top)

        g = grid
        while g < top:
            line(x0, sy(g), x1, sy(g), (225, 225, 225), 1)
            g += grid
        line(x0, y0, x1, y0, (0, 0, 0), 1)
        line(x0, y0, x0, y1, (0, 0, 0), 1)
        for values, color in series:
            pts = [(sx(x), sy(v)) for x, v in zip(xs, values)]
            for a, b in zip(pts, pts[1:]):
                line(*a, *b, color)
            for x, y in pts:
                for dx in range(-3, 4):
                    for dy in range(-3, 4):
                        put(x + dx, y + dy, color)
    path.parent.mkdir(parents=True, exist_ok=True)
    _png(path, W, H, px)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--max-model-len", type=int, default=262144)
    p.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens (prefill chunk)")
    p.add_argument("--decode", type=int, default=16, help="tokens generated after the prompt")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--needle", type=int, default=None, help="prompt length of the needle check (0: skip)")
    p.add_argument("--png", default=str(REPO / "docs" / "long_context.png"))
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-needle", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child_needle(args) if args.child_needle else child_run(args)))
        return 0
    rows = []
    base = [sys.executable, __file__, "--max-model-len", str(args.max_model_len), "--chunk", str(args.chunk),
            "--decode", str(args.decode), "--dtype", args.dtype]
    for n in args.lengths:
        out = subprocess.run(base + ["--child", str(n)], capture_output=True, text=True, env=os.environ)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{n:>7} tokens: prefill {r['prefill_s']:7.1f} s ({n / r['prefill_s']:6.0f} tok/s), decode "
              f"{r['decode_tokens']} tokens {r['decode_s']:5.2f} s; peak RSS {r['peak_rss'] / GiB:.3f} GiB "
              f"(baseline {r['baseline_rss'] / GiB:.3f}, above it {(r['peak_rss'] - r['baseline_rss']) / GiB:.3f}); "
              f"plan {r['plan_bytes'] / GiB:.3f} GiB (resident {r['plan_resident'] / GiB:.3f} + transient "
              f"{r['plan_transient'] / GiB:.3f} measured, {r['plan_transient_estimated'] / GiB:.3f} estimated + "
              f"caches {r['plan_seq'] / GiB:.3f}); ratio "
              f"{(r['peak_rss'] - r['baseline_rss']) / r['plan_bytes']:.2f}", flush=True)
    if args.needle:
        out = subprocess.run(base + ["--child", "0", "--child-needle", "--needle", str(args.needle)],
                             capture_output=True, text=True, env=os.environ)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"needle {r['needle_distance']} tokens back: top-20 logprobs move by up to {r['needle_max_diff']:.2e} "
              f"({r['needle_tokens_swapped_in_top20']} tokens swapped in the top 20); the same prompt twice: "
              f"{r['repeat_max_diff']:.1e}")
    if args.png and len(rows) > 1:
        plot(rows, Path(args.png))
        print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

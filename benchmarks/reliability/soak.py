"""Soak at ~80% of capacity (QUALITY.md #5): memory flat, latency steady, no error, for MINUTES minutes.

A real `nemoh serve` process on the demo model. Capacity is measured first (requests/s of the mix, CLIENTS
clients in a closed loop); then requests of the mix (chat and completions, streamed or not, with tools,
thinking on and off, 48 tokens) arrive in an open loop at LOAD x capacity for MINUTES minutes. The first
WARMUP minutes are warm-up. Per window of WINDOW minutes: requests, errors, p50/p99 latency, the server's RSS.
Bar: RSS at the end < 1.05 x RSS after warm-up, p99 of the last window < 1.10 x p99 of the first window after
warm-up, no error, the engine idle at the end.

    python benchmarks/reliability/soak.py                          # full scale: 30 minutes
    python benchmarks/reliability/soak.py --minutes 3 --warmup 1 --window 1   # quick look
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Result, Server, client, closed_loop, header, mixed_request, percentile, send, start_server, table, \
    wait_engine_idle  # noqa: E402

CLIENTS = 16


async def open_loop(server: Server, rate: float, minutes: float, window_s: float) -> tuple[list[list[Result]], list[int]]:
    """Requests every 1/rate s for `minutes`; returns the results and the server's RSS per window."""
    windows: list[list[Result]] = []
    rss: list[int] = []
    start = time.perf_counter()
    end = start + minutes * 60
    pending: set[asyncio.Task] = set()
    async with client(256, timeout=120) as http:
        i = 0
        next_window = start + window_s
        current: list[Result] = []
        windows.append(current)

        def finished(task: asyncio.Task, bucket: list[Result]) -> None:
            pending.discard(task)
            bucket.append(task.result())

        while time.perf_counter() < end:
            now = time.perf_counter()
            if now >= next_window:
                rss.append(server.rss_bytes())
                current = []
                windows.append(current)
                next_window += window_s
            delay = start + i / rate - now
            if delay > 0:
                await asyncio.sleep(min(delay, next_window - now))
                continue
            kind, body = mixed_request(i)
            task = asyncio.create_task(send(http, server.base_url, kind, body))
            pending.add(task)
            task.add_done_callback(lambda t, b=current: finished(t, b))
            i += 1
        if pending:
            await asyncio.wait(pending, timeout=120)
        rss.append(server.rss_bytes())
    return windows, rss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=5.0, help="minutes of warm-up, excluded (default 5)")
    p.add_argument("--window", type=float, default=5.0, help="minutes per window (default 5)")
    p.add_argument("--load", type=float, default=0.8, help="fraction of capacity (default 0.8)")
    p.add_argument("--capacity-seconds", type=float, default=60.0)
    args = p.parse_args(argv)
    header(f"soak at {args.load:.0%} of capacity for {args.minutes:g} minutes")
    server = start_server("--max-num-seqs", str(CLIENTS))
    try:
        asyncio.run(closed_loop(server.base_url, CLIENTS, 10.0, 64))  # warm-up of the capacity measurement
        results, elapsed = asyncio.run(closed_loop(server.base_url, CLIENTS, args.capacity_seconds, 1_000_000))
        bad = [r for r in results if r.status != 200 or r.error]
        capacity = len(results) / elapsed
        rate = args.load * capacity
        print(f"# capacity {capacity:.2f} req/s ({len(results)} requests, {len(bad)} failed); soaking at "
              f"{rate:.2f} req/s", flush=True)
        windows, rss = asyncio.run(open_loop(server, rate, args.minutes, args.window * 60))
        idle_s = wait_engine_idle(server, 60)
        metrics = server.metrics()
    finally:
        rc = server.stop()
    rows = []
    warm = int(round(args.warmup / args.window))
    for k, (w, mem) in enumerate(zip(windows, rss)):
        lat = [r.latency_s for r in w if r.status == 200 and not r.error]
        errors = [r for r in w if r.status != 200 or r.error]
        label = f"minutes {k * args.window:g}-{(k + 1) * args.window:g}" + (" (warm-up)" if k < warm else "")
        rows.append((label, f"{len(w)} requests, {len(errors)} errors, latency p50 {percentile(lat, 0.5):.2f} s, "
                     f"p99 {percentile(lat, 0.99):.2f} s, RSS {mem / 2**20:.0f} MiB", "-"))
    measured = [w for w in windows[warm:] if w]
    p99 = [percentile([r.latency_s for r in w if r.status == 200 and not r.error], 0.99) for w in measured]
    rss_after = rss[warm - 1] if warm >= 1 else rss[0]
    growth = rss[-1] / rss_after - 1
    drift = p99[-1] / p99[0] - 1 if len(p99) >= 2 else float("nan")
    errors = [r for w in windows for r in w if r.status != 200 or r.error]
    total = sum(len(w) for w in windows)
    rows += [
        ("capacity (closed loop, 16 clients) / soak rate", f"{capacity:.2f} / {rate:.2f} req/s", f"{args.load:.0%}"),
        ("requests, errors", f"{total}, {len(errors)}", "0 errors"),
        ("errors by cause (status 0: no answer within the client's 120 s)",
         dict(Counter(f"{r.status} {(r.error or '').split(':')[0]}" for r in errors)) or "none", "none"),
        ("RSS growth after warm-up", f"{rss_after / 2**20:.0f} -> {rss[-1] / 2**20:.0f} MiB ({growth:+.1%})", "< 5%"),
        ("p99 latency drift (first -> last window after warm-up)",
         f"{p99[0]:.2f} -> {p99[-1]:.2f} s ({drift:+.1%})" if len(p99) >= 2 else "n/a", "< 10%"),
        ("engine idle at the end", f"{idle_s * 1000:.0f} ms, KV blocks used "
         f"{metrics.get('nemoh:engine_kv_blocks_used', -1):.0f}", "0"),
        ("server exit status on SIGTERM", rc, "0"),
    ]
    table(rows)
    for r in errors[:5]:
        print("error:", r)
    ok = not errors and growth < 0.05 and drift < 0.10 and rc == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Dropped streams at full scale (QUALITY.md #4): 1,000 streaming requests, half dropped after the first token.

A real `nemoh serve` process on the demo model; CONCURRENCY clients at a time. Even-numbered requests close
their connection as soon as the first generated text arrives (they asked for 400 tokens with ignore_eos, so
an engine that kept them would run for seconds); odd-numbered ones read to the end. Measured:
- for each dropped stream, the time from the client's close to the engine's abort (the server logs
  "Aborted request X." when the request's KV blocks and Mamba slot are freed; both clocks are this machine's);
- the kept streams: all end with [DONE], and their greedy text equals the text of the same request sent alone
  before the run;
- the engine afterwards: no request running or waiting, every KV block and Mamba slot free.

    python benchmarks/reliability/dropped_streams.py                       # full scale: 1000 streams, 32 at once
    python benchmarks/reliability/dropped_streams.py --requests 100        # quick look
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MODEL, USER_TURNS, StreamResult, abort_times, header, percentile, start_server, stream_raw, table,
    wait_engine_idle,
)

ABORT_BAR_S = 1.0


def request(i: int) -> tuple[str, dict]:
    """Request i: chat and completions alternate in pairs, so both routes see drops and complete streams."""
    text = USER_TURNS[(i // 4) % len(USER_TURNS)]
    dropped = i % 2 == 0
    tokens = {"max_tokens": 400, "ignore_eos": True} if dropped else {"max_tokens": 24}
    if (i // 2) % 2 == 0:
        return "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}],
                                        "temperature": 0, **tokens}
    return "/v1/completions", {"model": MODEL, "prompt": text, "temperature": 0, **tokens}


async def run(base_url: str, n: int, concurrency: int) -> list[StreamResult]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> StreamResult:
        path, body = request(i)
        async with gate:
            return await stream_raw(base_url, path, body, drop_after_first=i % 2 == 0)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def references(base_url: str) -> dict[str, str]:
    """The text of every distinct kept request, each sent alone."""
    out = {}
    for i in range(1, 4 * len(USER_TURNS) * 2, 2):
        path, body = request(i)
        key = f"{path} {body.get('prompt') or body['messages'][0]['content']}"
        if key not in out:
            r = await stream_raw(base_url, path, body)
            assert r.done, r
            out[key] = r.text
    return out


def key_of(i: int) -> str:
    path, body = request(i)
    return f"{path} {body.get('prompt') or body['messages'][0]['content']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    args = p.parse_args(argv)
    header(f"{args.requests} streams, half dropped after the first token")
    server = start_server("--max-num-seqs", str(args.concurrency), "--max-waiting-requests", str(args.concurrency))
    try:
        refs = asyncio.run(references(server.base_url))
        start = time.monotonic()
        results = asyncio.run(run(server.base_url, args.requests, args.concurrency))
        elapsed = time.monotonic() - start
        idle_s = wait_engine_idle(server, 30)
        metrics = server.metrics()
        aborted = abort_times(server.log())
    finally:
        rc = server.stop()
    dropped = [r for i, r in enumerate(results) if i % 2 == 0]
    kept = [(i, r) for i, r in enumerate(results) if i % 2 == 1]
    not_dropped = [r for r in dropped if r.dropped_at is None]
    latency, missing = [], []
    for r in dropped:
        if r.dropped_at is None:
            continue
        t = aborted.get(f"{r.request_id}-0")
        if t is None:
            missing.append(r.request_id)
        else:
            latency.append(max(0.0, t - r.dropped_at))
    kept_bad = [(i, r) for i, r in kept if r.status != 200 or not r.done or r.error]
    wrong = [(i, r) for i, r in kept if r.done and r.text != refs[key_of(i)]]
    worst = max(latency, default=float("nan"))
    table([
        ("streams", f"{len(results)} in {elapsed:.1f} s, {args.concurrency} at once", "-"),
        ("dropped after the first token", f"{len(dropped) - len(not_dropped)} of {len(dropped)}", "all"),
        ("dropped ones aborted in the engine (log line found)", f"{len(latency)} of {len(dropped)}", "all"),
        ("client close -> engine abort, p50 / p99 / max", f"{percentile(latency, 0.5) * 1000:.0f} / "
         f"{percentile(latency, 0.99) * 1000:.0f} / {worst * 1000:.0f} ms (log clock: 1 ms steps)",
         f"max < {ABORT_BAR_S * 1000:.0f} ms"),
        ("kept streams ending with [DONE]", f"{len(kept) - len(kept_bad)} of {len(kept)}", "all"),
        ("kept streams whose greedy text differs from the request alone", len(wrong), "0"),
        ("engine idle after the last stream", f"{idle_s * 1000:.0f} ms: KV blocks used "
         f"{metrics.get('nemoh:engine_kv_blocks_used', -1):.0f}, Mamba slots used "
         f"{metrics.get('nemoh:engine_mamba_slots_used', -1):.0f}, running "
         f"{metrics.get('nemoh:num_requests_running', -1):.0f}", "0 / 0 / 0"),
        ("server exit status on SIGTERM", rc, "0"),
    ])
    for i, r in (kept_bad + wrong)[:5]:
        print(f"kept stream {i}: {r}")
    for r in not_dropped[:5]:
        print("never dropped:", r)
    ok = (not not_dropped and not missing and worst < ABORT_BAR_S and not kept_bad and not wrong and rc == 0)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Overload at 10x capacity (QUALITY.md #6): refusals come at once, accepted requests finish, capacity survives.

The server runs the demo model with 4 running slots and a waiting queue of 16 (20 requests in the engine at
most). Capacity is measured first (requests/s of the soak's request mix with 8 clients, closed loop), then:
- bursts of FACTOR x 20 requests sent at once, ROUNDS times;
- an open loop at FACTOR x the measured capacity for SECONDS s (arrivals evenly spaced);
then capacity is measured again. Bar: every request not served gets 429 or 503 with Retry-After in < 100 ms,
every accepted one finishes with a well-formed answer, capacity afterwards within 10% of before, the engine
idle at the end.

    python benchmarks/reliability/overload.py                 # full scale: factor 10, 3 bursts, 30 s open loop
    python benchmarks/reliability/overload.py --rounds 1 --seconds 5 --capacity-seconds 5   # quick look
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SMALL_ENGINE, Result, Server, closed_loop, header, mixed_request, percentile, raw_request, start_server, table,
    wait_engine_idle,
)

SLOTS = 4 + 16
REFUSAL_BAR_S = 0.1


def _path(body: dict[str, Any]) -> str:
    return "/v1/completions" if "prompt" in body else "/v1/chat/completions"


async def burst(server: Server, n: int, max_tokens: int) -> list[Result]:
    """`n` requests of the mix at once, over connections opened beforehand (so the burst times the server, not
    the TCP handshakes)."""
    host, port = server.base_url.split("//", 1)[1].rsplit(":", 1)
    connections = [await asyncio.open_connection(host, int(port)) for _ in range(n)]
    bodies = [mixed_request(i, max_tokens)[1] for i in range(n)]
    return list(await asyncio.gather(*(raw_request(server.base_url, _path(b), b, connection=c)
                                       for b, c in zip(bodies, connections))))


async def open_loop(server: Server, rate: float, seconds: float, max_tokens: int) -> list[Result]:
    """Requests of the mix arriving every 1/rate s for `seconds` s, whatever happens to the earlier ones."""
    start = time.perf_counter()
    tasks = []
    for i in range(max(1, int(rate * seconds))):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = mixed_request(i, max_tokens)[1]
        tasks.append(asyncio.create_task(raw_request(server.base_url, _path(body), body)))
    return list(await asyncio.gather(*tasks))


def capacity(server: Server, seconds: float, max_tokens: int) -> tuple[float, float]:
    """(requests/s, p50 latency s) with 8 clients in a closed loop; every request must succeed."""
    results, elapsed = asyncio.run(closed_loop(server.base_url, 8, seconds, 100_000, max_tokens))
    bad = [r for r in results if r.status != 200 or r.error]
    if bad:
        raise AssertionError(f"capacity run: {len(bad)} failed, e.g. {bad[0]}")
    return len(results) / elapsed, percentile([r.latency_s for r in results], 0.5)


def summarize(results: list[Result]) -> dict[str, Any]:
    refused = [r for r in results if r.status in (429, 503)]
    served = [r for r in results if r.status == 200]
    other = [r for r in results if r.status not in (200, 429, 503)]
    return {
        "sent": len(results), "served": len(served), "refused": len(refused), "other": other,
        "served_failed": [r for r in served if r.error],
        "refused_without_retry_after": [r for r in refused if not r.retry_after],
        "refusal_s": [r.latency_s for r in refused],
    }


def run(factor: int = 10, rounds: int = 3, seconds: float = 30.0, capacity_seconds: float = 20.0,
        max_tokens: int = 32, server: Server | None = None, script: str | None = None) -> dict[str, Any]:
    own = server is None
    server = server or start_server(*SMALL_ENGINE, script=script)
    try:
        asyncio.run(closed_loop(server.base_url, 4, 5.0, 16, max_tokens))  # warm-up
        before, p50_before = capacity(server, capacity_seconds, max_tokens)
        bursts = []
        for _ in range(rounds):
            bursts.append(summarize(asyncio.run(burst(server, factor * SLOTS, max_tokens))))
            wait_engine_idle(server, 60)
        sustained = summarize(asyncio.run(open_loop(server, factor * before, seconds, max_tokens)))
        wait_engine_idle(server, 60)
        after, p50_after = capacity(server, capacity_seconds, max_tokens)
        idle_s = wait_engine_idle(server, 10)
        rss = server.rss_bytes()
    finally:
        if own:
            server.stop()
    everything = bursts + [sustained]
    refusal = [s for b in everything for s in b["refusal_s"]]
    return {
        "capacity_before_rps": before, "capacity_after_rps": after, "p50_before_s": p50_before,
        "p50_after_s": p50_after, "bursts": bursts, "sustained": sustained, "refusal_s": refusal,
        "other": [r for b in everything for r in b["other"]],
        "served_failed": [r for b in everything for r in b["served_failed"]],
        "refused_without_retry_after": [r for b in everything for r in b["refused_without_retry_after"]],
        "idle_s": idle_s, "rss_bytes": rss, "factor": factor,
    }


def _latencies(values: list[float]) -> str:
    if not values:
        return "none"
    return (f"{len(values)}: {percentile(values, 0.5) * 1000:.1f} / {percentile(values, 0.99) * 1000:.1f} / "
            f"{max(values) * 1000:.1f} ms")


def report(out: dict[str, Any]) -> bool:
    refusal = out["refusal_s"]
    worst = max(refusal, default=0.0)
    ratio = out["capacity_after_rps"] / out["capacity_before_rps"]
    b = out["bursts"]
    s = out["sustained"]
    ok = (not out["other"] and not out["served_failed"] and not out["refused_without_retry_after"]
          and refusal and worst < REFUSAL_BAR_S and ratio >= 0.9)
    table([
        ("capacity before (8 clients, mix, 32 tokens)", f"{out['capacity_before_rps']:.1f} req/s, "
         f"p50 {out['p50_before_s'] * 1000:.0f} ms", "-"),
        (f"bursts of {out['factor']} x {SLOTS}", "; ".join(f"{x['served']} served / {x['refused']} refused" for x in b),
         "-"),
        (f"open loop at {out['factor']} x capacity", f"{s['sent']} sent, {s['served']} served, {s['refused']} refused",
         "-"),
        ("refusals: 429/503 with Retry-After", f"{len(refusal)} of {len(refusal)}, "
         f"{len(out['refused_without_retry_after'])} without Retry-After", "all"),
        ("refusal latency p50 / p99 / max", f"{percentile(refusal, 0.5) * 1000:.1f} / "
         f"{percentile(refusal, 0.99) * 1000:.1f} / {worst * 1000:.1f} ms", "max < 100 ms"),
        ("  of which in the bursts", _latencies([t for x in b for t in x["refusal_s"]]), "max < 100 ms"),
        ("  of which in the open loop", _latencies(s["refusal_s"]), "max < 100 ms"),
        ("accepted requests that failed", len(out["served_failed"]), "0"),
        ("other statuses", len(out["other"]), "0"),
        ("capacity after", f"{out['capacity_after_rps']:.1f} req/s ({ratio:.2f} x before), "
         f"p50 {out['p50_after_s'] * 1000:.0f} ms", ">= 0.9 x before"),
        ("engine idle after the last request", f"{out['idle_s'] * 1000:.0f} ms", "KV blocks and slots free"),
    ])
    for r in (out["other"] + out["served_failed"])[:5]:
        print("failure:", r)
    print("PASS" if ok else "FAIL")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factor", type=int, default=10, help="load as a multiple of capacity (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="bursts of factor x 20 requests (default 3)")
    p.add_argument("--seconds", type=float, default=30.0, help="open loop length (default 30)")
    p.add_argument("--capacity-seconds", type=float, default=20.0, help="each capacity measurement (default 20)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--script", default=None, help="start the server with `python SCRIPT serve ...` (a wrapper)")
    args = p.parse_args(argv)
    header("overload at 10x capacity")
    out = run(args.factor, args.rounds, args.seconds, args.capacity_seconds, args.max_tokens, script=args.script)
    return 0 if report(out) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Shutdown (QUALITY.md #8): SIGTERM with --shutdown-timeout: new requests 503, in-flight ones finish, exit on time.

A real server process on the demo model with --shutdown-timeout TIMEOUT. SHORT streams that finish well within
the timeout and 2 streams that cannot (3,500 tokens) are running when SIGTERM arrives. Then a new request every
50 ms until the process is gone. Measured: the statuses of the new requests (503 + Retry-After), /health
during the drain, how the in-flight streams ended, the exit status and the time from SIGTERM to exit.

    python benchmarks/reliability/shutdown.py
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import AUTH, MODEL, USER_TURNS, header, start_server, stream_raw, table  # noqa: E402


async def run(server, timeout: float, short: int) -> dict:
    bodies = [("/v1/completions", {"model": MODEL, "prompt": USER_TURNS[i % 8], "max_tokens": 32,
                                   "ignore_eos": True}) for i in range(short)]
    bodies += [("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                         "max_tokens": 3500, "ignore_eos": True})] * 2
    streams = [asyncio.create_task(stream_raw(server.base_url, path, body, timeout=timeout + 30))
               for path, body in bodies]
    deadline = time.monotonic() + 30
    while server.metrics().get("nemoh:num_requests_running", 0) < len(bodies) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    running = server.metrics().get("nemoh:num_requests_running", 0)
    server.proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    new, health = [], []
    async with httpx.AsyncClient(headers=AUTH, timeout=5) as http:
        while server.proc.poll() is None and time.monotonic() - start < timeout + 30:
            try:
                r = await http.post(server.base_url + "/v1/completions", json={"prompt": "new", "max_tokens": 4})
                new.append((r.status_code, r.headers.get("retry-after")))
                health.append((await http.get(server.base_url + "/health")).status_code)
            except httpx.HTTPError:
                pass  # the listening socket closed: the process is exiting
            await asyncio.sleep(0.05)
    while server.proc.poll() is None and time.monotonic() - start < timeout + 30:
        await asyncio.sleep(0.01)
    exit_s = time.monotonic() - start
    results = await asyncio.gather(*streams)
    return {"running": running, "new": new, "health": health, "exit_s": exit_s, "rc": server.proc.poll(),
            "short": results[:short], "long": results[short:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeout", type=float, default=10.0, help="--shutdown-timeout (default 10 s)")
    p.add_argument("--short", type=int, default=8)
    args = p.parse_args(argv)
    header(f"SIGTERM with --shutdown-timeout {args.timeout:g}")
    server = start_server("--shutdown-timeout", str(args.timeout))
    try:
        out = asyncio.run(run(server, args.timeout, args.short))
    finally:
        server.stop(10)
    new_503 = [s for s, ra in out["new"] if s == 503 and ra]
    short_done = [r for r in out["short"] if r.done]
    long_cut = [r for r in out["long"] if not r.done or r.finish_reason == "abort"]
    table([
        ("streams running at SIGTERM", f"{out['running']:.0f}", f"{args.short + 2}"),
        ("new requests during the drain", f"{len(out['new'])}: {len(new_503)} got 503 + Retry-After", "all 503"),
        ("/health during the drain", sorted(set(out["health"])), "[503]"),
        ("short in-flight streams that finished ([DONE])", f"{len(short_done)} of {args.short}", "all"),
        ("long streams: how they ended", sorted({r.finish_reason or r.error or "no [DONE]" for r in out["long"]}),
         "abort"),
        ("long in-flight streams cut at the deadline", f"{len(long_cut)} of 2", "2"),
        ("exit status, time from SIGTERM to exit", f"{out['rc']}, {out['exit_s']:.1f} s",
         f"0, <= {args.timeout:g} s"),
    ])
    ok = (len(new_503) == len(out["new"]) > 0 and set(out["health"]) <= {503} and len(short_done) == args.short
          and len(long_cut) == 2 and out["rc"] == 0 and out["exit_s"] <= args.timeout)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

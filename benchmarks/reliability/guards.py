"""Size limits, auth and templates at scale (QUALITY.md #3, #9, #10) against a real server process.

1. Size limits: oversized bodies (declared and chunked) -> 413, oversized headers -> 431; a header flood
   (FLOODS requests of 100 kB headers, 16 connections at a time, each reset by its client) leaves the server's
   RSS flat and the server healthy.
2. Auth: every (method, path) of the OpenAPI document plus the docs routes, without a key, with a wrong key and
   with a wrong scheme, REPEAT times each, concurrently: all 401 (only /health answers).
3. Templates: request-supplied chat templates are refused by default (400, REPEAT requests); on a server started
   with --trust-request-chat-template, a template that loops, one that recurses and one reaching for
   `__globals__` are each answered 4xx within 1 s and run nothing.

    python benchmarks/reliability/guards.py
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import API_KEY, AUTH, MODEL, header, percentile, start_server, table  # noqa: E402

FLOOD = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Flood: " + b"a" * 100_000 + b"\r\n\r\n"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def flood(host: str, port: int, n: int, concurrency: int) -> dict[int, int]:
    gate = asyncio.Semaphore(concurrency)
    statuses: dict[int, int] = {}

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(FLOOD)
                head = await asyncio.wait_for(reader.read(64), 30)
                status = int(head.split(b" ", 2)[1]) if head else 0
            except (OSError, asyncio.TimeoutError, IndexError, ValueError):
                status = 0
            statuses[status] = statuses.get(status, 0) + 1
            writer.transport.abort()  # reset: the case uvicorn used to keep alive for its keep-alive timeout

    await asyncio.gather(*(one() for _ in range(n)))
    return statuses


def size_limits(server, floods: int) -> list[tuple]:
    host, port = server.base_url.split("//", 1)[1].rsplit(":", 1)
    url = server.base_url + "/v1/chat/completions"
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (9 * 2**20)}]}
    body_statuses = [httpx.post(url, headers=AUTH, json=big, timeout=30).status_code for _ in range(20)]

    def chunks():
        yield b'{"model": "nemoh-demo", "messages": [{"role": "user", "content": "'
        for _ in range(9 * 1024):
            yield b"x" * 1024
        yield b'"}]}'

    chunked = [httpx.post(url, headers=AUTH, content=chunks(), timeout=30).status_code for _ in range(5)]
    header_statuses = [httpx.get(server.base_url + "/health", headers={"X-Big": "y" * 20_000}).status_code
                       for _ in range(20)]
    asyncio.run(flood(host, int(port), 200, 16))  # warm-up
    before = server.rss_bytes()
    start = time.monotonic()
    statuses = asyncio.run(flood(host, int(port), floods, 16))
    elapsed = time.monotonic() - start
    time.sleep(1.0)
    after = server.rss_bytes()
    healthy = httpx.get(server.base_url + "/health").status_code == 200
    growth = after / before - 1
    return [
        ("oversized bodies (9 MiB, Content-Length)", f"{body_statuses.count(413)} of 20 -> 413", "413"),
        ("oversized chunked bodies (9 MiB, no Content-Length)", f"{chunked.count(413)} of 5 -> 413", "413"),
        ("oversized headers (20 kB)", f"{header_statuses.count(431)} of 20 -> 431", "431"),
        (f"header flood: {floods} x 100 kB, 16 at once, {floods / elapsed:.0f}/s",
         ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())), "431 (0: reset before the answer)"),
        ("server RSS across the flood", f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB ({growth:+.1%})",
         "flat (< 5%)"),
        ("/health after the flood", 200 if healthy else "not 200", "200"),
    ], (body_statuses.count(413) == 20 and chunked.count(413) == 5 and header_statuses.count(431) == 20
        and growth < 0.05 and healthy)


async def auth_barrage(base_url: str, repeat: int) -> tuple[dict[str, set[int]], int, float]:
    doc = httpx.get(base_url + "/openapi.json", headers=AUTH).json()
    routes = [(m.upper(), p) for p, ops in doc["paths"].items() for m in ops]
    routes += [("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json"), ("GET", "/docs/oauth2-redirect"),
               ("GET", "/no/such/route"), ("POST", "/v1/embeddings")]
    wrong = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
             {"Authorization": "Bearer " + API_KEY[:-1]}, {"X-API-Key": "x" * 4000}]
    seen: dict[str, set[int]] = {}
    latency: list[float] = []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32), timeout=httpx.Timeout(30, pool=None)) as http:
        async def one(method: str, path: str, headers: dict) -> None:
            start = time.perf_counter()
            r = await http.request(method, base_url + path, headers=headers, json=CHAT)
            latency.append(time.perf_counter() - start)
            seen.setdefault(f"{method} {path}", set()).add(r.status_code)

        await asyncio.gather(*(one(m, p, h) for _ in range(repeat) for m, p in routes for h in wrong))
    return seen, len(latency), percentile(latency, 0.99)


def templates(repeat: int) -> tuple[list[tuple], bool]:
    rows, ok = [], True
    server = start_server()
    try:
        statuses = [httpx.post(server.base_url + "/v1/chat/completions", headers=AUTH, timeout=30,
                               json={**CHAT, "chat_template": "{{ messages }}"}).status_code for _ in range(repeat)]
        rows.append(("request-supplied chat_template, default server", f"{statuses.count(400)} of {repeat} -> 400",
                     "400"))
        ok &= statuses.count(400) == repeat
    finally:
        server.stop()
    marker = Path(tempfile.gettempdir()) / f"nemoh-template-escape-{os.getpid()}"
    hostile = {
        "a loop of 10^12 steps": "{% for i in range(10**6) %}{% for j in range(10**6) %}x{% endfor %}{% endfor %}",
        "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "__globals__ -> os.system": "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}",
        "__subclasses__": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    }
    server = start_server("--trust-request-chat-template")
    try:
        for name, template in hostile.items():
            times, codes = [], []
            for _ in range(5):
                start = time.perf_counter()
                r = httpx.post(server.base_url + "/v1/chat/completions", headers=AUTH, timeout=30,
                               json={**CHAT, "chat_template": template})
                times.append(time.perf_counter() - start)
                codes.append(r.status_code)
            rows.append((f"trusted server, template with {name}", f"statuses {sorted(set(codes))}, slowest "
                         f"{max(times) * 1000:.0f} ms", "4xx in < 1 s"))
            ok &= all(400 <= c < 500 for c in codes) and max(times) < 1.0
        healthy = httpx.get(server.base_url + "/health").status_code == 200
        rows.append(("template escape ran a command", marker.exists(), "False"))
        rows.append(("/health after the hostile templates", 200 if healthy else "not 200", "200"))
        ok &= not marker.exists() and healthy
    finally:
        server.stop()
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--floods", type=int, default=5000)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    header("size limits, auth and templates at scale")
    server = start_server()
    try:
        rows, ok = size_limits(server, args.floods)
        seen, n, p99 = asyncio.run(auth_barrage(server.base_url, args.repeat))
    finally:
        server.stop()
    leaks = {route: codes for route, codes in seen.items() if codes != {401} and route != "GET /health"}
    rows += [
        (f"routes without a valid key ({len(seen)} routes x 5 wrong keys x {args.repeat})",
         f"{n} requests; {len(seen) - 1 - len(leaks)} of {len(seen) - 1} routes all 401, p99 {p99 * 1000:.0f} ms",
         "401 everywhere but /health"),
        ("routes that answered anything but 401", leaks or "none", "none"),
    ]
    ok &= not leaks and seen.get("GET /health") == {200}
    template_rows, template_ok = templates(args.repeat)
    table(rows + template_rows)
    ok &= template_ok
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

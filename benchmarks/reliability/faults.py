"""Fault injection (QUALITY.md #7): one failing request fails alone; a fatal engine error ends the process.

A real server process on the demo model, started through faulty_serve.py (faults chosen by request seed):
1. ROUNDS rounds of 12 good requests (chat and completions, streamed or not, greedy) sent together with 4
   requests whose processing raises inside the engine: the 4 get an error (500, or an error event in their
   stream), the 12 get exactly the text they get alone, the engine ends idle and healthy;
2. a request that makes the engine loop raise (fatal), with 4 good requests in flight: every client gets an
   answer (no hang), /health turns non-200, the process exits non-zero; the times are measured;
3. corrupted checkpoints (a truncated shard, a garbled header, an empty file): `nemoh serve` exits with status
   2 and a message naming the file, before listening.

    python benchmarks/reliability/faults.py
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL, REPO, USER_TURNS, Result, header, send, start_server, table, wait_engine_idle  # noqa: E402
from faulty_serve import FAIL_SEED, FATAL_SEED  # noqa: E402

SCRIPT = str(Path(__file__).resolve().parent / "faulty_serve.py")
DEMO = REPO / "nemoh" / "demo" / "model"


def good(i: int) -> tuple[str, dict]:
    text = USER_TURNS[i % len(USER_TURNS)]
    stream = (i // 2) % 2 == 1
    if i % 2:
        return f"completion {i}", {"model": MODEL, "prompt": text, "max_tokens": 24, "temperature": 0,
                                   "stream": stream}
    return f"chat {i}", {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 24,
                         "temperature": 0, "stream": stream}


def faulty(i: int, seed: int) -> dict:
    body = good(i)[1]
    return {**body, "seed": seed, "max_tokens": 64}


async def round_trip(base_url: str, good_ids: range, faulty_bodies: list[dict]) -> tuple[list[Result], list[Result]]:
    async with httpx.AsyncClient(headers={"Authorization": "Bearer sk-reliability"}, timeout=60) as http:
        tasks = [send(http, base_url, *good(i)) for i in good_ids]
        tasks += [send(http, base_url, "faulty", b) for b in faulty_bodies]
        results = await asyncio.gather(*tasks)
    return list(results[:len(good_ids)]), list(results[len(good_ids):])


def failed_properly(r: Result) -> bool:
    """A request whose processing raised must get an error: a 500, or an error event inside its stream."""
    return (r.status == 500) or (r.status == 200 and r.error is not None and "engine" in r.error)


def corrupted_checkpoints() -> list[tuple[str, int, str, float]]:
    """(case, exit status, last line of stderr, seconds) of `nemoh serve` on three corrupted copies."""
    out = []
    for case in ("truncated shard", "garbled header", "empty shard"):
        with tempfile.TemporaryDirectory() as tmp:
            for f in DEMO.iterdir():
                shutil.copy(f, tmp)
            shard = Path(tmp) / "model.safetensors"
            size = shard.stat().st_size
            with open(shard, "r+b") as fh:
                if case == "truncated shard":
                    fh.truncate(size // 2)
                elif case == "garbled header":
                    fh.seek(8)
                    fh.write(b'{"garbage')
                else:
                    fh.truncate(0)
            start = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "nemoh", "serve", tmp, "--port", "0"], cwd=REPO,
                                  capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
            lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines() or ["(nothing)"]
            out.append((case, proc.returncode, lines[-1].replace(tmp, "<dir>"), time.monotonic() - start))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    header("fault injection")
    server = start_server("--max-num-seqs", "16", script=SCRIPT)
    rows = []
    ok = True
    try:
        refs = {}
        for i in range(12):  # each good request alone: the reference text
            (r,), _ = asyncio.run(round_trip(server.base_url, range(i, i + 1), []))
            assert r.status == 200 and not r.error, r
            refs[i] = r.text
        good_bad, faulty_ok, text_diff = 0, 0, 0
        for k in range(args.rounds):
            goods, faults = asyncio.run(round_trip(server.base_url, range(12),
                                                   [faulty(k * 4 + j, FAIL_SEED) for j in range(4)]))
            good_bad += sum(r.status != 200 or r.error is not None for r in goods)
            text_diff += sum(r.status == 200 and r.text != refs[i] for i, r in enumerate(goods))
            faulty_ok += sum(failed_properly(r) for r in faults)
            for r in faults:
                if not failed_properly(r):
                    print("faulty request not failed properly:", r)
        idle_s = wait_engine_idle(server, 30)
        healthy = httpx.get(server.base_url + "/health").status_code == 200
        failed_total = server.metrics().get("nemoh:engine_requests_failed_total", -1)
        n_faulty = 4 * args.rounds
        rows += [
            (f"faulty requests answered with an error ({args.rounds} rounds)", f"{faulty_ok} of {n_faulty}", "all"),
            ("good requests beside them that failed", f"{good_bad} of {12 * args.rounds}", "0"),
            ("good requests whose greedy text differs from alone", text_diff, "0"),
            ("engine failed-request counter", f"{failed_total:.0f}", str(n_faulty)),
            ("after: /health, engine idle", f"{'200' if healthy else 'not 200'}, {idle_s * 1000:.0f} ms", "200"),
        ]
        ok &= faulty_ok == n_faulty and good_bad == 0 and text_diff == 0 and healthy and failed_total == n_faulty

        # a fatal engine error with four good requests in flight
        async def fatal() -> tuple[list[Result], float, float]:
            async with httpx.AsyncClient(headers={"Authorization": "Bearer sk-reliability"}, timeout=30) as http:
                inflight = [asyncio.create_task(send(http, server.base_url, *good(i))) for i in range(4)]
                await asyncio.sleep(0.05)
                start = time.monotonic()
                killer = asyncio.create_task(send(http, server.base_url, "fatal", faulty(0, FATAL_SEED)))
                health_s = float("nan")
                while time.monotonic() - start < 30:
                    try:
                        if (await http.get(server.base_url + "/health")).status_code != 200:
                            health_s = time.monotonic() - start
                            break
                    except httpx.HTTPError:
                        health_s = time.monotonic() - start
                        break
                    await asyncio.sleep(0.01)
                answers = await asyncio.gather(killer, *inflight)
                return list(answers), health_s, start

        answers, health_s, start = asyncio.run(fatal())
        try:
            rc = server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rc = None
        exit_s = time.monotonic() - start
        statuses = sorted({r.status for r in answers})
        rows += [
            ("fatal engine error: /health non-200 after", f"{health_s * 1000:.0f} ms", "non-200"),
            ("fatal engine error: process exit status, after", f"{rc}, {exit_s:.1f} s", "non-zero, no hang"),
            ("fatal engine error: answers of the 5 requests in flight", f"statuses {statuses} (0: connection "
             f"closed), {sum(r.error is None and r.status == 200 for r in answers)} complete", "every one answered"),
        ]
        ok &= rc not in (None, 0) and health_s == health_s
    finally:
        server.stop()
    for case, rc, line, seconds in corrupted_checkpoints():
        rows.append((f"corrupted checkpoint: {case}", f"exit {rc} after {seconds:.1f} s: {line[:150]}",
                     "exit 2, names the file"))
        ok &= rc == 2 and "model.safetensors" in line
    table(rows)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Issue 35's reliability points at test scale; the full-scale runs are benchmarks/reliability/*.py.

Auth over every route the app has, admission control (refusals that read nothing and wait for nothing), dropped
streams, fault injection, corrupted checkpoints, header floods and a short soak.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from nemoh import cli
from nemoh.server.middleware import AUTH_ALLOWLIST
from server_fakes import ScriptedEngine
from server_helpers import (
    API_KEY, DEMO_DIR, MODEL_NAME, free_socket, real_engine, start_server, stop_real, wait_healthy,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
REPO = Path(__file__).resolve().parents[2]
FAULTY_SERVE = REPO / "benchmarks" / "reliability" / "faulty_serve.py"
USER = [{"role": "user", "content": "My VPN is down, what should I do?"}]


def _rss_bytes() -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


def test_every_route_of_the_app_needs_the_key(server_factory, demo_tokenizer):
    """Enumerates the app's own routes, so a route added later cannot escape the key."""
    s = server_factory(ScriptedEngine(demo_tokenizer, script="ok"))
    assert AUTH_ALLOWLIST == {"/health"}
    checked = 0
    for route in s.app.routes:
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method == "HEAD":
                continue
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
                r = httpx.request(method, s.base_url + path, headers=headers, json={})
                if path in AUTH_ALLOWLIST:
                    assert r.status_code == 200, (method, path)
                else:
                    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", \
                        (method, path, r.status_code)
                    checked += 1
    assert checked >= 3 * 10  # the API, the docs and the metrics routes


def _raw_head_only(host: str, port: int, path: str) -> tuple[int, dict[str, str], float]:
    """POST with a declared body that is never sent; returns (status, headers, seconds to the answer)."""
    with socket.create_connection((host, port), timeout=10) as sock:
        start = time.perf_counter()
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        elapsed = time.perf_counter() - start
    head = data.split(b"\r\n\r\n")[0].decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
    return int(head[0].split()[1]), headers, elapsed


def test_refusal_at_capacity_reads_no_body_and_waits_for_no_engine(server_factory, demo_tokenizer):
    """At capacity the guard answers 429 + Retry-After before reading the body: a request whose body never
    comes is refused at once (a refusal decided after parsing and templating would wait for the body, here
    forever), and the engine never sees it. Capacity is given back when requests end."""
    engine = ScriptedEngine(demo_tokenizer, script="tick " * 400, delay=0.01)
    s = server_factory(engine, max_admitted_requests=2)
    stop = threading.Event()

    def hold() -> None:
        with httpx.stream("POST", s.base_url + "/v1/completions", headers=AUTH,
                          json={"prompt": "x", "max_tokens": 500, "stream": True}) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    break

    holders = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
    for t in holders:
        t.start()
    deadline = time.monotonic() + 10
    while len(engine.running) < 2:
        assert time.monotonic() < deadline, "the two holding requests never started"
        time.sleep(0.01)
    seen = len(engine.requests)
    for path in ("/v1/chat/completions", "/v1/completions"):
        status, headers, _ = _raw_head_only(s.host, s.port, path)
        assert status == 429 and int(headers["retry-after"]) >= 1
    assert len(engine.requests) == seen
    assert httpx.post(s.base_url + "/tokenize", headers=AUTH, json={"prompt": "hi"}).status_code == 200  # not counted
    stop.set()
    for t in holders:
        t.join(10)
    deadline = time.monotonic() + 5
    while s.state.num_admitted:
        assert time.monotonic() < deadline, f"admission slots not given back: {s.state.num_admitted}"
        time.sleep(0.01)
    r = httpx.post(s.base_url + "/v1/completions", headers=AUTH, json={"prompt": "x", "max_tokens": 3})
    assert r.status_code == 200


def test_burst_over_capacity_refused_at_once_and_the_accepted_finish(tiny_checkpoint):
    engine = real_engine(tiny_checkpoint, max_num_seqs=2, max_waiting_requests=2)
    server = start_server(engine, max_admitted_requests=engine.max_num_requests)
    body = json.dumps({"model": MODEL_NAME, "prompt": "burst", "max_tokens": 64, "ignore_eos": True}).encode()

    async def one(reader, writer) -> tuple[int, bool, float]:
        start = time.perf_counter()
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                     .encode() + body)
        head = await reader.readuntil(b"\r\n\r\n")
        elapsed = time.perf_counter() - start
        rest = await reader.read()
        writer.close()
        return int(head.split(b" ", 2)[1]), b"retry-after" in head.lower() or b'"finish_reason"' in rest, elapsed

    async def burst():
        connections = [await asyncio.open_connection(server.host, server.port) for _ in range(40)]
        return await asyncio.gather(*(one(r, w) for r, w in connections))

    try:
        # more sequences than the engine can ever hold: a 400 (a 429 would invite retries that cannot succeed)
        r = httpx.post(server.base_url + "/v1/completions", headers=AUTH, json={"prompt": ["a", "b"], "n": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        results = asyncio.run(burst())
        served = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 429]
        assert len(served) + len(refused) == 40 and len(served) >= 4 and len(refused) >= 20, results
        assert all(ok for _, ok, _ in results)  # 429s carry Retry-After; 200s carry a finished completion
        slowest_refusal = max(t for _, _, t in refused)
        # not a latency bar (CI is 2 shared cores): the refusals must not wait for the accepted requests'
        # generation, which takes 64 engine steps each
        assert slowest_refusal < min(t for _, _, t in served) + 1.0, (slowest_refusal, served)
        assert server.state.num_admitted == 0
    finally:
        stop_real(server)


def test_refusals_wait_for_no_engine_step(tiny_checkpoint):
    """At capacity, refusals are answered while the engine is inside a 2 s step that runs Python the whole time
    (the engine thread holds the GIL but for the interpreter's switches): the guard's 429 needs the event loop
    only, never the engine thread to finish a step."""
    engine = real_engine(tiny_checkpoint, max_num_seqs=1, max_waiting_requests=1)
    runner = engine.engine.runner
    execute = runner.execute

    def busy_step(scheduled):
        end = time.perf_counter() + 2.0
        while time.perf_counter() < end:
            pass
        return execute(scheduled)

    runner.execute = busy_step
    server = start_server(engine, max_admitted_requests=engine.max_num_requests)
    stop = threading.Event()

    def hold() -> None:
        with httpx.stream("POST", server.base_url + "/v1/completions", headers=AUTH, timeout=60,
                          json={"prompt": "x", "max_tokens": 50, "ignore_eos": True, "stream": True}) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    break

    holders = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
    try:
        for t in holders:
            t.start()
        deadline = time.monotonic() + 20
        while server.state.num_admitted < 2 or not engine.engine.scheduler.num_running:
            assert time.monotonic() < deadline, "the two holding requests never started"
            time.sleep(0.01)
        times = []
        for path in ("/v1/chat/completions", "/v1/completions") * 3:
            status, headers, elapsed = _raw_head_only(server.host, server.port, path)
            assert status == 429 and int(headers["retry-after"]) >= 1
            times.append(elapsed)
        # not the 100 ms bar of QUALITY.md (CI is 2 shared cores): far below one step
        assert max(times) < 0.5, times
    finally:
        stop.set()
        runner.execute = execute
        for t in holders:
            t.join(30)
        stop_real(server)


class _AbortLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = re.fullmatch(r"Aborted request (\S+)\.", record.getMessage())
        if match:
            self.times[match.group(1)] = record.created


def _stream(base: str, path: str, body: dict, drop: bool) -> tuple[str | None, str, bool, float | None]:
    """(response id, text, ended with [DONE], time.time() of the drop)."""
    rid, parts = None, []
    with httpx.stream("POST", base + path, headers=AUTH, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line == "data: [DONE]":
                return rid, "".join(parts), True, None
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            rid = rid or event["id"]
            for choice in event["choices"]:
                piece = choice.get("text") or (choice.get("delta") or {}).get("content") \
                    or (choice.get("delta") or {}).get("reasoning_content") or ""
                parts.append(piece)
                if drop and piece:
                    return rid, "".join(parts), False, time.time()  # leaving the block closes the connection
    return rid, "".join(parts), False, None


def test_dropped_streams_are_aborted_within_a_second_and_the_rest_complete(real_server):
    engine, base = real_server.engine, real_server.base_url
    requests = [("/v1/completions", {"prompt": f"ticket {i % 3}", "temperature": 0}) if i % 4 < 2 else
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"ticket {i % 3}"}],
                                          "temperature": 0}) for i in range(24)]
    refs = {}
    for path, body in requests:
        key = json.dumps([path, body])
        if key not in refs:
            refs[key] = _stream(base, path, {**body, "max_tokens": 12}, drop=False)[1]
    log = _AbortLog()
    logger = logging.getLogger("nemoh.engine.async_engine")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(log)
    try:
        def one(i: int):
            path, body = requests[i]
            tokens = {"max_tokens": 200, "ignore_eos": True} if i % 2 == 0 else {"max_tokens": 12}
            return _stream(base, path, {**body, **tokens}, drop=i % 2 == 0)

        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(24)))
        deadline = time.monotonic() + 5
        while any(engine.stats()[k] for k in ("num_unfinished_requests", "kv_blocks_used", "mamba_slots_used")):
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.01)
    finally:
        logger.removeHandler(log)
        logger.setLevel(old_level)
    for i, (rid, text, done, dropped_at) in enumerate(results):
        if i % 2 == 0:
            assert dropped_at is not None and not done
            aborted_at = log.times.get(f"{rid}-0")
            assert aborted_at is not None, f"stream {i} ({rid}) was never aborted in the engine"
            assert aborted_at - dropped_at < 1.0, (i, aborted_at - dropped_at)
        else:
            assert done and text == refs[json.dumps(list(requests[i]))], (i, text)


def _with_fault(engine, bad_seed: int):
    core = engine.engine
    original = core._postprocess

    def postprocess(r, *args):
        if r.scheduled.seq.params.seed == bad_seed:
            raise RuntimeError("injected fault")
        return original(r, *args)

    core._postprocess = postprocess


def test_an_exception_in_one_request_fails_that_request_only(tiny_checkpoint):
    engine = real_engine(tiny_checkpoint)
    _with_fault(engine, bad_seed=666)
    server = start_server(engine)
    try:
        good = [{"prompt": f"good {i}", "max_tokens": 16, "temperature": 0, "stream": i % 2 == 1} for i in range(6)]
        bad = [{"prompt": "bad", "max_tokens": 16, "seed": 666, "stream": s} for s in (False, True)]

        def send(body: dict) -> tuple[int, str]:
            r = httpx.post(server.base_url + "/v1/completions", headers=AUTH, json=body, timeout=60)
            return r.status_code, r.text

        alone = [send(b) for b in good]
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(send, good + bad))

        def text(status_body: tuple[int, str], stream: bool) -> str:
            status, body = status_body
            assert status == 200, body
            if not stream:
                return json.loads(body)["choices"][0]["text"]
            events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
            assert body.rstrip().endswith("data: [DONE]")
            return "".join(c["text"] for e in events for c in e["choices"])

        for b, a, t in zip(good, alone, together):
            assert text(t, b["stream"]) == text(a, b["stream"])
        (status, body), (sstatus, sbody) = together[6:]
        assert status == 500 and json.loads(body)["error"]["code"] == "engine_error"
        assert sstatus == 500 or '"engine_error"' in sbody  # before or after the stream's first chunk
        assert httpx.get(server.base_url + "/health").status_code == 200 and engine.is_healthy()
        assert engine.stats()["requests_failed_total"] == 2
    finally:
        stop_real(server)


def test_fatal_engine_error_ends_the_process_non_zero(tiny_checkpoint):
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, str(FAULTY_SERVE), "serve", str(tiny_checkpoint), "--port", str(port),
                             "--max-model-len", "256", "--cache-memory-gb", "0.05", "--log-level", "warning"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, timeout=120)
        r = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 8, "seed": 777}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
        try:
            assert httpx.get(base + "/health").status_code != 200
        except httpx.HTTPError:
            pass  # already gone
        assert proc.wait(timeout=30) == 1
        assert b"fatal error" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("damage", ["truncated", "garbled header", "empty"])
def test_corrupted_checkpoint_is_a_clear_error_at_load(tmp_path, capsys, damage):
    for f in DEMO_DIR.iterdir():
        shutil.copy(f, tmp_path)
    shard = tmp_path / "model.safetensors"
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        if damage == "truncated":
            fh.truncate(size - 1000)
        elif damage == "garbled header":
            fh.seek(8)
            fh.write(b'{"garbage')
        else:
            fh.truncate(0)
    assert cli.main(["serve", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert str(shard) in err and ("corrupt" in err or "truncated" in err), err


def test_header_floods_leave_memory_flat(real_server):
    flood = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Flood: " + b"a" * 100_000 + b"\r\n\r\n"

    def one() -> int:
        with socket.create_connection((real_server.host, real_server.port), timeout=10) as s:
            try:
                s.sendall(flood)
            except OSError:  # the server may close before reading it all
                pass
            reply = s.recv(256)
        return int(reply.split(b" ", 2)[1])

    for _ in range(50):  # warm-up
        assert one() == 431
    before = _rss_bytes()
    for _ in range(500):
        assert one() == 431
    grown = _rss_bytes() - before
    # 500 floods of 100 kB: 50 MB if each were kept
    assert grown < 10 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB over 500 header floods"
    assert httpx.get(real_server.base_url + "/health").status_code == 200


def test_short_soak_keeps_memory_and_leaves_the_engine_idle(real_server):
    """A minute-scale soak in miniature: 3 rounds of mixed requests; no error, RSS flat after the first."""
    base, engine = real_server.base_url, real_server.engine
    c = real_server.client()

    def mixed(i: int) -> None:
        kind = i % 4
        if kind == 0:
            r = c.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=16, seed=i)
            assert r.choices[0].finish_reason in ("stop", "length")
        elif kind == 1:
            chunks = list(c.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=16, stream=True,
                                                    extra_body={"chat_template_kwargs": {"enable_thinking": False}}))
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        elif kind == 2:
            r = c.completions.create(model=MODEL_NAME, prompt="The printer", max_tokens=16, logprobs=2, seed=i)
            assert r.choices[0].finish_reason in ("stop", "length")
        else:
            chunks = list(c.completions.create(model=MODEL_NAME, prompt="The printer", max_tokens=16, stream=True))
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    from concurrent.futures import ThreadPoolExecutor
    rss = []
    with ThreadPoolExecutor(6) as pool:
        for _ in range(3):
            list(pool.map(mixed, range(60)))
            rss.append(_rss_bytes())
    assert rss[-1] < rss[0] * 1.05, [r / 2**20 for r in rss]
    stats = engine.stats()
    assert stats["num_unfinished_requests"] == 0 and stats["kv_blocks_used"] == 0 and stats["mamba_slots_used"] == 0
    assert httpx.get(base + "/health").status_code == 200

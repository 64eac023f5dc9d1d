"""`nemoh serve --tensor-parallel-size 2` on the CPU (a spawned worker, gloo): it answers chat requests, and a
worker killed under it turns /health red and makes the server exit non-zero within 10 seconds."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx



def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc, base: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(base + "/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.3)


def children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def test_tp2_server_answers_and_exits_when_a_worker_dies(tp_checkpoints):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nemoh", "serve", tp_checkpoints["f32"], "--port", str(port), "--device", "cpu",
         "--tensor-parallel-size", "2", "--served-model-name", "x", "--max-model-len", "512", "--cache-memory-gb", "0.05",
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base)
        r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "model": "x", "max_tokens": 8, "messages": [{"role": "user", "content": "my VPN is down"}]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] > 0
        workers = [c for c in children(proc.pid) if "nemoh" in open(f"/proc/{c}/cmdline").read()
                   or "multiprocessing" in open(f"/proc/{c}/cmdline").read()]
        assert workers
        t0 = time.monotonic()
        os.kill(workers[-1], signal.SIGKILL)
        rc = proc.wait(timeout=10)
        assert rc != 0 and time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

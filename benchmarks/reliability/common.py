"""What the reliability scripts share: a real `nemoh serve` process on 127.0.0.1, its RSS and engine counters,
an httpx load client, percentiles and the machine line for docs/reliability.md.

Every wait here is bounded in time; every server is started on 127.0.0.1 with port 0 (the banner says which port
it got), so two scripts or a test suite can run side by side.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-reliability"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "nemoh-demo"
_URL_LINE = re.compile(r"URL +(https?://[^\s/]+)/v1")
# A small engine, so that "capacity" is a handful of requests: 4 running and 16 waiting, the figures of issue 35.
SMALL_ENGINE = ("--max-num-seqs", "4", "--max-waiting-requests", "16", "--cache-memory-gb", "0.05")


@dataclass
class Server:
    proc: subprocess.Popen
    base_url: str
    log_path: Path
    started_s: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        """Resident memory of the server process (VmRSS), 0 once it has exited."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0
        match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
        return int(match.group(1)) * 1024 if match else 0

    def metrics(self, timeout: float = 10.0) -> dict[str, float]:
        """`GET /metrics` as {name{labels}: value}."""
        r = httpx.get(self.base_url + "/metrics", headers=AUTH, timeout=timeout)
        r.raise_for_status()
        return parse_metrics(r.text)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait up to `timeout` s, then SIGKILL; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def parse_metrics(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def engine_idle(metrics: dict[str, float]) -> bool:
    """No request in the engine and every KV block and Mamba state slot free."""
    keys = ("nemoh:num_requests_running", "nemoh:num_requests_waiting", "nemoh:engine_num_unfinished_requests",
            "nemoh:engine_kv_blocks_used", "nemoh:engine_mamba_slots_used")
    return all(metrics.get(k, 1.0) == 0.0 for k in keys)


def start_server(*args: str, script: str | None = None, env: dict[str, str] | None = None,
                 timeout: float = 180.0) -> Server:
    """Start `nemoh serve ARGS` (or `python SCRIPT ARGS`, a wrapper that patches nemoh first) with the demo model
    on 127.0.0.1, a free port and the API key; returns once /health answers 200."""
    log = Path(tempfile.mkstemp(prefix="nemoh-serve-", suffix=".log")[1])
    command = [sys.executable, script] if script else [sys.executable, "-m", "nemoh"]
    command += ["serve", "--host", "127.0.0.1", "--port", "0", "--api-key", API_KEY, "--log-level", "info", *args]
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    deadline = started + timeout
    base_url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nemoh serve exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        if base_url is None:
            match = _URL_LINE.search(log.read_text(errors="replace"))
            base_url = match.group(1) if match else None
        if base_url is not None:
            try:
                if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                    return Server(proc, base_url, log, time.monotonic() - started)
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    proc.kill()
    proc.wait(10)
    raise RuntimeError(f"nemoh serve did not answer /health within {timeout} s:\n{log.read_text(errors='replace')}")


def wait_engine_idle(server: Server, timeout: float) -> float:
    """Seconds until the engine is idle (see engine_idle); raises AssertionError after `timeout`."""
    start = time.monotonic()
    metrics: dict[str, float] = {}
    while time.monotonic() - start < timeout:
        metrics = server.metrics()
        if engine_idle(metrics):
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"engine not idle after {timeout} s: "
                         f"{ {k: v for k, v in metrics.items() if 'used' in k or 'requests_' in k} }")


def client(max_connections: int, timeout: float = 120.0) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(headers=AUTH, limits=limits, timeout=timeout)


# ---------------------------------------------------------------------------------------------- request mix

USER_TURNS = ["My VPN is down, what should I do?", "The printer on floor 3 jams.", "Reset my password please.",
              "Outlook keeps asking for my password.", "Can you order a new laptop charger?",
              "My screen flickers after the update.", "Is the wifi down in building B?", "Thanks, that fixed it!"]
TOOLS = [{"type": "function", "function": {
    "name": "lookup_user", "description": "Find an employee account by email address.",
    "parameters": {"type": "object", "properties": {"email": {"type": "string"}}, "required": ["email"]}}},
    {"type": "function", "function": {
        "name": "create_ticket", "description": "Open a help-desk ticket.",
        "parameters": {"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}}}]
MIX = ("plain", "stream", "tools", "tools_stream", "no_think", "no_think_stream", "completion", "completion_stream")


def mixed_request(i: int, max_tokens: int = 48) -> tuple[str, dict[str, Any]]:
    """Request `i` of the soak's mix: chat streamed or not, with tools, thinking on or off, raw completions."""
    kind = MIX[i % len(MIX)]
    text = USER_TURNS[(i // len(MIX)) % len(USER_TURNS)]
    stream = kind.endswith("stream")
    if kind.startswith("completion"):
        return kind, {"model": MODEL, "prompt": text, "max_tokens": max_tokens, "stream": stream, "seed": i}
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": text}],
                            "max_tokens": max_tokens, "stream": stream, "seed": i}
    if kind.startswith("tools"):
        body["tools"] = TOOLS
    if kind.startswith("no_think"):
        body["chat_template_kwargs"] = {"enable_thinking": False}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return kind, body


@dataclass
class Result:
    kind: str
    status: int
    latency_s: float
    ttft_s: float | None = None
    error: str | None = None
    retry_after: str | None = None
    text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


async def send(http: httpx.AsyncClient, base_url: str, kind: str, body: dict[str, Any]) -> Result:
    """One request, streamed or not; a 200 must end well (a [DONE] for streams, a finish_reason otherwise)."""
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    start = time.perf_counter()
    try:
        if not body.get("stream"):
            r = await http.post(base_url + path, json=body)
            latency = time.perf_counter() - start
            if r.status_code != 200:
                return Result(kind, r.status_code, latency, error=r.text[:300], retry_after=r.headers.get("retry-after"))
            choice = r.json()["choices"][0]
            text = choice.get("text") or (choice.get("message") or {}).get("content") or ""
            ok = choice.get("finish_reason") in ("stop", "length", "tool_calls")
            return Result(kind, 200, latency, text=text, error=None if ok else f"finish_reason {choice}")
        ttft = None
        parts: list[str] = []
        async with http.stream("POST", base_url + path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(kind, r.status_code, time.perf_counter() - start, error=r.text[:300],
                              retry_after=r.headers.get("retry-after"))
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    return Result(kind, 200, time.perf_counter() - start, error=str(event["error"])[:300])
                for choice in event.get("choices", ()):
                    delta = choice.get("delta") or {}
                    piece = choice.get("text") or delta.get("content") or delta.get("reasoning_content") or ""
                    if ttft is None and (piece or delta.get("tool_calls")):
                        ttft = time.perf_counter() - start
                    parts.append(piece)
        latency = time.perf_counter() - start
        return Result(kind, 200, latency, ttft, None if done else "stream ended without [DONE]", text="".join(parts))
    except httpx.HTTPError as e:
        return Result(kind, 0, time.perf_counter() - start, error=f"{type(e).__name__}: {e}")


async def closed_loop(base_url: str, concurrency: int, duration_s: float, max_requests: int,
                      max_tokens: int = 48) -> tuple[list[Result], float]:
    """`concurrency` clients, each sending the next request of the mix as soon as its previous one ended, for
    `duration_s` seconds or `max_requests` requests in all; returns the results and the elapsed time."""
    results: list[Result] = []
    counter = iter(range(max_requests))
    start = time.perf_counter()
    deadline = start + duration_s

    async def worker(http: httpx.AsyncClient) -> None:
        for i in counter:
            if time.perf_counter() >= deadline:
                return
            kind, body = mixed_request(i, max_tokens)
            results.append(await send(http, base_url, kind, body))

    async with client(concurrency) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return results, time.perf_counter() - start


async def raw_request(base_url: str, path: str, body: dict[str, Any], timeout: float = 120.0,
                      connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None) -> Result:
    """One POST over a plain asyncio connection (`Connection: close`), read to the end.

    For bursts: httpx's client spends ~2 ms of CPU per request here, so 200 requests at once cost the client
    0.4-7 s on this 2-core machine (measured: 200 concurrent GET /health on an idle server, p50 0.8-1.8 s),
    which would be charged to the server. This client's cost per request is a write and a read. The latency
    is from the write of the request to the end of the response head (status and headers); a 200 is then
    read to the end and checked like `send` checks it. Pass `connection` to use one opened beforehand.
    """
    host, port = base_url.split("//", 1)[1].rsplit(":", 1)
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    kind = "stream" if body.get("stream") else "plain"
    reader, writer = connection or await asyncio.open_connection(host, int(port))
    start = time.perf_counter()
    try:
        writer.write(head.encode() + data)
        raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        latency = time.perf_counter() - start
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        payload = await asyncio.wait_for(reader.read(), timeout)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
        return Result(kind, 0, time.perf_counter() - start, error=f"{type(e).__name__}: {e}")
    finally:
        writer.close()
    if status != 200:
        return Result(kind, status, latency, error=payload[:300].decode(errors="replace"),
                      retry_after=headers.get("retry-after"))
    if body.get("stream"):
        ok = b"data: [DONE]" in payload and b'"error"' not in payload
    else:
        text = payload.decode(errors="replace")
        if headers.get("transfer-encoding") == "chunked":  # not expected for JSON; checked anyway
            text = text[text.find("{"): text.rfind("}") + 1]
        ok = '"finish_reason":"' in text.replace(" ", "") and '"error"' not in text
    return Result(kind, 200, latency, error=None if ok else f"bad answer: {payload[:300]!r}")


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0-1) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def machine() -> str:
    """The line docs/reliability.md gives for where a figure was measured."""
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()}-core {cpu}, {platform.system()} {platform.release()}, load average {load} at the start"


def header(title: str) -> None:
    print(f"# {title}\n# {time.strftime('%Y-%m-%d %H:%M:%S %Z')} on {machine()}\n# {' '.join(sys.argv)}", flush=True)


def table(rows: list[tuple[str, Any, str]]) -> None:
    """Print `| figure | measured | bar |` rows as a markdown table (pasted into docs/reliability.md)."""
    print("| figure | measured | bar |\n|---|---|---|")
    for name, value, bar in rows:
        print(f"| {name} | {value} | {bar} |")


# ---------------------------------------------------------------------------------------------- raw streams

@dataclass
class StreamResult:
    status: int
    request_id: str | None = None      # the response's `id` (engine requests are `<id>-<choice>`)
    text: str = ""
    done: bool = False                 # the stream ended with [DONE]
    finish_reason: str | None = None
    dropped_at: float | None = None    # time.time() when the client closed the connection
    error: str | None = None


async def stream_raw(base_url: str, path: str, body: dict[str, Any], drop_after_first: bool = False,
                     timeout: float = 120.0) -> StreamResult:
    """One streamed request over a plain connection; with `drop_after_first`, the connection is closed as soon
    as the first chunk with generated text (or a tool call) has arrived, and the time of the close recorded."""
    host, port = base_url.split("//", 1)[1].rsplit(":", 1)
    data = json.dumps({**body, "stream": True}).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    out = StreamResult(0)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode() + data)
        raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        out.status = int(raw_head.split(b" ", 2)[1])
        if out.status != 200:
            out.error = (await asyncio.wait_for(reader.read(), timeout))[:300].decode(errors="replace")
            return out
        parts: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                break
            line = line.strip()
            # chunked transfer encoding: size lines and blank lines carry no event
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                out.done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                out.error = str(event["error"])[:300]
                break
            out.request_id = out.request_id or event.get("id")
            for choice in event.get("choices", ()):
                delta = choice.get("delta") or {}
                piece = choice.get("text") or delta.get("content") or delta.get("reasoning_content") or ""
                parts.append(piece)
                out.finish_reason = choice.get("finish_reason") or out.finish_reason
                if drop_after_first and (piece or delta.get("tool_calls")):
                    out.dropped_at = time.time()
                    writer.transport.abort()   # the client vanishes: no more reads, the socket is gone
                    out.text = "".join(parts)
                    return out
        out.text = "".join(parts)
        if not out.done and out.error is None:
            out.error = "stream ended without [DONE]"
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
        out.error = f"{type(e).__name__}: {e}"
    finally:
        writer.close()
    return out


_ABORT_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO \S+: Aborted request (\S+)\.$", re.MULTILINE)


def abort_times(log: str) -> dict[str, float]:
    """{engine request id: time.time() of its abort} from the server log ('Aborted request X.' lines)."""
    out = {}
    for stamp, ms, request_id in _ABORT_LINE.findall(log):
        out[request_id] = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
    return out

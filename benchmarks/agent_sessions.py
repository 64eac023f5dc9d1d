"""Multi-turn agent sessions against the server with the prefix cache on vs off.

Two `nemoh serve` apps run side by side in this process over the same checkpoint (default: the bundled demo
model, which was trained on the IT-helpdesk chat format with tools), one with `enable_prefix_caching=True`,
one with False. First a session is *recorded* on the cached server (greedy, so both servers write the same
replies): the ticket agent's loop (examples/ticket_agent.py: model -> tool calls -> tool results -> ...) and a
longer synthetic session of `--turns` turns whose user messages carry tool output (log lines, search results).
Then every recorded request is replayed, streamed, against both servers, alternating which goes first, and
per turn we print: prompt tokens, prefill tokens computed (prompt - usage.prompt_tokens_details.cached_tokens),
time to first token on each side and their ratio. Then `--sessions` synthetic sessions run concurrently, and
the concurrent run is repeated with deliberately small caches (few Mamba snapshot slots and KV blocks) to show
how the hit rate degrades. Decode speed is measured on a long reply on each side.

    python benchmarks/agent_sessions.py                   # demo model, ~2-4 minutes on 2 CPU cores
    python benchmarks/agent_sessions.py --turns 14 --sessions 4

Goals (issue 32): from turn 2 on >= 90% of the tokens already seen come from the cache; time to first token of
late turns >= 5x lower than without the cache; decode speed unchanged (within noise).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

import nemoh.demo
from nemoh.chat import ChatTemplate
from nemoh.engine.async_engine import AsyncLLMEngine
from nemoh.server.app import build_app
from nemoh.server.runner import ServerThread, make_server
from nemoh.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import ticket_agent  # noqa: E402  (the example's tickets, system prompt and fake backends)

DEMO = Path(nemoh.demo.__file__).parent / "model"
MODEL = "nemoh-bench"


class Server:
    def __init__(self, model_dir: Path, **engine_args):
        import socket

        self.engine = AsyncLLMEngine.from_pretrained(str(model_dir), **engine_args)
        settings = ServerSettings(served_model_names=[MODEL], enable_auto_tool_choice=True)
        app = build_app(self.engine, settings, ChatTemplate.from_model_dir(model_dir))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        host, port = sock.getsockname()
        self.thread = ServerThread(make_server(app, host, port, log_level="warning"), sock).start()
        self.url = f"http://{host}:{port}/v1/chat/completions"
        self.tokenize_url = f"http://{host}:{port}/tokenize"
        self.http = httpx.Client(timeout=600)

    def tokenize(self, body: dict) -> list[int]:
        r = self.http.post(self.tokenize_url, json={"model": MODEL, "messages": body["messages"],
                                                     **({"tools": body["tools"]} if "tools" in body else {})})
        r.raise_for_status()
        return r.json()["tokens"]

    def chat(self, body: dict) -> dict:
        r = self.http.post(self.url, json={"model": MODEL, **body})
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
        return r.json()

    def stream(self, body: dict) -> tuple[float, dict, float, int]:
        """(time to first token, usage, decode seconds after the first token, chunks with tokens)."""
        start, first, last, n = time.perf_counter(), None, None, 0
        usage = None
        body = {"model": MODEL, **body, "stream": True, "stream_options": {"include_usage": True}}
        with self.http.stream("POST", self.url, json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                if any(delta.get(k) for k in ("content", "reasoning_content", "tool_calls")):
                    now = time.perf_counter()
                    first = first or now
                    last, n = now, n + 1
        return (first or time.perf_counter()) - start, usage, (last or 0) - (first or 0), n

    def stop(self):
        self.thread.stop()
        asyncio.run(self.engine.shutdown(0))


# ---- recording sessions ---------------------------------------------------------------------------------
def record_ticket_session(server: Server, tools: list[dict], max_tokens: int) -> list[dict]:
    """The ticket agent's loop over its scripted tickets, one conversation per ticket; returns every request."""
    requests = []
    for ticket in ticket_agent.TICKETS:
        backends = ticket_agent.Backends()
        messages = [{"role": "system", "content": ticket_agent.SYSTEM_PROMPT}, {"role": "user", "content": ticket.text}]
        for _ in range(4):
            body = {"messages": list(messages), "tools": tools, "temperature": 0, "max_tokens": max_tokens}
            requests.append(body)
            msg = server.chat(body)["choices"][0]["message"]
            calls = msg.get("tool_calls") or []
            messages.append({"role": "assistant", "content": msg.get("content") or "",
                             **({"tool_calls": calls} if calls else {})})
            if not calls:
                break
            for call in calls:
                result = backends.call(call["function"]["name"], call["function"]["arguments"])
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)})
    return requests


def tool_output(rng: random.Random, turn: int, n_lines: int) -> str:
    hosts = ["vpn-gw-01", "mail-02", "print-03", "wifi-ctl", "dc-01"]
    lines = [f"2025-03-{turn + 1:02d} 10:{i:02d}:{rng.randrange(60):02d} {rng.choice(hosts)} "
             f"{rng.choice(['INFO', 'WARN', 'ERROR'])} session={rng.randrange(10**6)} latency_ms={rng.randrange(900)}"
             for i in range(n_lines)]
    return "Tool result (search_logs):\n" + "\n".join(lines)


def record_long_session(server: Server, turns: int, seed: int, max_tokens: int, lines: int) -> list[dict]:
    """A synthetic troubleshooting session: every turn brings a tool result of `lines` log lines."""
    rng = random.Random(seed)
    messages = [{"role": "system", "content": ticket_agent.SYSTEM_PROMPT},
                {"role": "user", "content": "Users on the 4th floor lose the VPN every few minutes. Investigate."}]
    requests = []
    for t in range(turns):
        body = {"messages": list(messages), "temperature": 0, "max_tokens": max_tokens}
        requests.append(body)
        reply = server.chat(body)["choices"][0]["message"]
        messages.append({"role": "assistant", "content": reply.get("content") or ""})
        messages.append({"role": "user", "content": tool_output(rng, t, lines)})
    return requests


# ---- replaying ------------------------------------------------------------------------------------------
def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def replay(requests: list[dict], on: Server, off: Server, title: str) -> None:
    """Each recorded request once per side (max_tokens 1: only the prefill and the first token), the side that
    goes first alternating. seen: the tokens at the start of this prompt that the previous request's prompt
    already had (what a cache can serve; the previous reasoning is not in the new prompt)."""
    print(f"\n## {title}: {len(requests)} requests, cache on vs off")
    print(f"{'req':>4} {'prompt':>7} {'computed on':>11} {'seen':>6} {'cached/seen':>11} "
          f"{'TTFT off ms':>11} {'TTFT on ms':>10} {'ratio':>6}")
    prev: list[int] = []
    late, shares = [], []
    for i, body in enumerate(requests):
        body = {**body, "max_tokens": 1}
        ids = on.tokenize(body)
        first_turn = len(body["messages"]) <= 2
        seen = 0 if first_turn else common_prefix(prev, ids)
        pair = [(off, "off"), (on, "on")] if i % 2 == 0 else [(on, "on"), (off, "off")]
        ttft, usage = {}, {}
        for server, name in pair:
            ttft[name], usage[name], _, _ = server.stream(body)
        prompt = usage["on"]["prompt_tokens"]
        cached = usage["on"]["prompt_tokens_details"]["cached_tokens"]
        assert usage["off"]["prompt_tokens_details"]["cached_tokens"] == 0 and prompt == len(ids)
        share = f"{cached / seen:11.1%}" if seen else f"{'-':>11}"
        ratio = ttft["off"] / ttft["on"]
        print(f"{i + 1:>4} {prompt:>7} {prompt - cached:>11} {seen:>6} {share} {1e3 * ttft['off']:>11.1f} "
              f"{1e3 * ttft['on']:>10.1f} {ratio:>6.1f}")
        if seen:
            shares.append(cached / seen)
        if not first_turn and i >= len(requests) // 2:
            late.append(ratio)
        prev = ids
    if shares:
        print(f"turns 2+: cached/seen min {min(shares):.1%}, median {statistics.median(shares):.1%}")
    if late:
        print(f"later half: median TTFT ratio off/on = {statistics.median(late):.1f}x over {len(late)} requests")


def concurrent(server: Server, sessions: list[list[dict]]) -> tuple[int, int, int, float, int]:
    """Run the sessions concurrently (turn by turn, each in its own thread); returns (prompt tokens from turn 2
    on, of them cached, tokens seen before, mean TTFT of turns 2+ in ms, failures)."""
    totals = {"prompt": 0, "cached": 0, "seen": 0, "ttft": [], "failed": 0}
    lock = threading.Lock()

    def run(requests):
        seen = 0
        for i, body in enumerate(requests):
            try:
                ttft, usage, _, _ = server.stream(body)
            except httpx.HTTPError as e:       # a timeout counts here too: the machine may stall the process
                with lock:
                    totals["failed"] += 1
                print(f"  request failed: {type(e).__name__}: {e}")
                continue
            with lock:
                if i:
                    totals["prompt"] += usage["prompt_tokens"]
                    totals["cached"] += usage["prompt_tokens_details"]["cached_tokens"]
                    totals["seen"] += seen
                    totals["ttft"].append(ttft)
            seen = usage["prompt_tokens"] + usage["completion_tokens"]

    threads = [threading.Thread(target=run, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (totals["prompt"], totals["cached"], totals["seen"], 1e3 * statistics.mean(totals["ttft"]),
            totals["failed"])


def decode_speeds(off: Server, on: Server, body: dict, rounds: int = 5) -> tuple[float, float]:
    """Median decode tok/s of each side, alternating which side goes first each round."""
    speeds: dict[int, list[float]] = {id(off): [], id(on): []}
    for r in range(rounds):
        for server in ((off, on) if r % 2 == 0 else (on, off)):
            _, usage, seconds, n = server.stream({**body, "max_tokens": 96, "ignore_eos": True})
            speeds[id(server)].append((n - 1) / seconds if seconds else 0.0)
    return statistics.median(speeds[id(off)]), statistics.median(speeds[id(on)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO)
    p.add_argument("--turns", type=int, default=12, help="turns of the long synthetic session")
    p.add_argument("--lines", type=int, default=5, help="log lines per tool result in the synthetic sessions")
    p.add_argument("--sessions", type=int, default=3, help="concurrent synthetic sessions")
    p.add_argument("--max-tokens", type=int, default=24, help="reply length in the synthetic sessions")
    p.add_argument("--agent-max-tokens", type=int, default=160, help="reply length in the ticket agent's loop")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    common = dict(dtype=args.dtype, device="cpu", max_model_len=4096, max_num_seqs=8, num_kv_blocks=2048,
                  num_state_slots=8, max_num_batched_tokens=8192)
    on, off = Server(args.model, **common), Server(args.model, enable_prefix_caching=False, **common)
    try:
        tools = json.loads((ROOT / "examples" / "demo_tools.json").read_text())
        tickets = record_ticket_session(on, tools, args.agent_max_tokens)
        long = record_long_session(on, args.turns, seed=0, max_tokens=args.max_tokens, lines=args.lines)
        many = [record_long_session(on, max(4, args.turns // 2), seed=s, max_tokens=args.max_tokens,
                                    lines=args.lines) for s in range(1, args.sessions + 1)]
        for server in (on, off):     # warm-up, and the recordings' entries out of the cache
            server.stream(long[0])
            server.engine.engine.reset_prefix_cache()
        replay(tickets, on, off, "ticket agent loop (examples/ticket_agent.py), 6 tickets")
        replay(long, on, off, f"synthetic session, {args.turns} turns with tool results")

        print(f"\n## {args.sessions} concurrent synthetic sessions, turns 2+")
        print(f"{'server':<34} {'prompt':>7} {'cached':>7} {'cached/seen':>11} {'TTFT ms':>8} {'failed':>6}")
        for name, server in (("cache off", off), ("cache on", on)):
            server.engine.engine.reset_prefix_cache()
            prompt, cached, seen, ttft, failed = concurrent(server, many)
            print(f"{name:<34} {prompt:>7} {cached:>7} {cached / max(seen, 1):>11.1%} {ttft:>8.1f} {failed:>6}")
        # the fewest KV blocks any one request needs (its prompt + reply + MTP lookahead): the small caches below
        # hold 2x and 1.25x that, so a request never fails for want of room, only the hits degrade
        longest = max(len(on.tokenize(session[-1])) for session in many) + args.max_tokens + 8
        need = -(-longest // 16)
        for slots, blocks in ((6, 2048), (4, 2048), (3, 2048), (2, 2048), (6, 2 * need), (6, need * 5 // 4)):
            small = Server(args.model, **{**common, "num_kv_blocks": blocks, "prefix_cache_state_slots": slots})
            try:
                prompt, cached, seen, ttft, failed = concurrent(small, many)
                c = small.engine.engine.prefix_cache.counters
                name = f"small cache: {slots} states, {blocks} blocks"
                print(f"{name:<34} {prompt:>7} {cached:>7} {cached / max(seen, 1):>11.1%} {ttft:>8.1f} "
                      f"{failed:>6}   (evicted {c.num_evicted})")
            finally:
                small.stop()

        print("\n## decode speed (96 tokens after a 12-turn context, medians of 5 alternating rounds)")
        body = long[-1]
        speed_off, speed_on = decode_speeds(off, on, body)
        print(f"cache off {speed_off:.1f} tok/s, cache on {speed_on:.1f} tok/s, ratio {speed_on / speed_off:.2f}")
    finally:
        on.stop()
        off.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

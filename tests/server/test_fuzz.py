"""Hostile-input fuzz against the real-engine server (QUALITY.md #2 and #3).

A corpus of malformed and hostile requests (bad JSON, wrong types, out-of-range numbers, n huge, token ids
out of vocab, unknown roles, non-object tool schemas, deep nesting, invalid UTF-8, prompts over the context,
oversized bodies and headers, wrong methods and content types) is built from a valid request by replacing
one field at a time, plus raw-byte cases. Every answer must be a 4xx in OpenAI's error shape within 1 s;
afterwards the server must be healthy and give the same greedy output as before.
"""
from __future__ import annotations

import json
import random
import socket
import time

import httpx

from server_helpers import API_KEY, MODEL_NAME

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 4}
GREEDY = {"model": MODEL_NAME, "prompt": "The laptop will not boot", "max_tokens": 8, "temperature": 0}

HUGE = [10**30, 2**63, 2**64 + 1, -(2**70), 1e308]
NOT_INT = ["10", 1.5, True, None, [], {}, "NaN"]
NOT_FLOAT = ["hot", [], {}, True]
NOT_STR = [1, 1.5, True, [], {}]
NOT_BOOL = ["yes", 2, [], {}]

SAMPLING_BAD = {
    "max_tokens": [-1, 0, -(2**40), *HUGE, "16", 1.5, [], {}],
    "n": [0, -1, 129, 10**9, *HUGE, "2", 1.5, []],
    "temperature": [-0.1, -1e9, 101, 1e309, *NOT_FLOAT],
    "top_p": [0, -0.5, 1.01, 1e9, *NOT_FLOAT],
    "top_k": [-2, 10**7, *HUGE, "5", 1.5],
    "min_p": [-0.1, 1.5, *NOT_FLOAT],
    "presence_penalty": [-2.1, 2.1, 1e20, *NOT_FLOAT],
    "frequency_penalty": [-3, 3, *NOT_FLOAT],
    "repetition_penalty": [0, -1, 11, *NOT_FLOAT],
    "seed": [2**64, -(2**63) - 1, 10**40, "7", 1.5, []],
    "stop": [[""], ["x"] * 17, ["y" * 300], 5, [1, 2], {"a": 1}, [None]],
    "stream": NOT_BOOL,
    "stream_options": [{"include_usage": True}, "yes", 1],  # stream_options without stream is an error
    "min_tokens": [-1, *HUGE, "1"],
    "stop_token_ids": [[-1], [2**40], "2", [[1]], list(range(65))],
    "model": [123, [], {}, "gpt-4", "../../etc/passwd", "nemoh-test\x00"],
}
CHAT_BAD = {
    "messages": [[], "hello", None, 5, [1], [None], [[]], [{"role": "user"}], [{"content": "hi"}],
                 [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 5}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
                 [{"role": "user", "content": [{"type": "text"}]}], [{"role": "system", "content": None}],
                 [{"role": "tool", "tool_calls": [{"function": {"name": "x"}}], "content": "x"}],
                 [{"role": "user", "content": "\ud800"}], [{"role": "user", "content": "x" * 5000}] * 4],
    "logprobs": NOT_BOOL,
    "top_logprobs": [-1, 21, 10**9, "3"],
    "tools": ["x", 5, {}, [None], [{"type": "function"}], [{"type": "retrieval", "function": {"name": "a"}}],
              [{"type": "function", "function": {"name": ""}}],
              [{"type": "function", "function": {"name": "bad name!"}}],
              [{"type": "function", "function": {"name": "a", "parameters": "not an object"}}],
              [{"type": "function", "function": {"name": "a", "parameters": []}}],
              [{"type": "function", "function": {"name": "a", "parameters": {"type": "string"}}}],
              [{"type": "function", "function": {"name": "a", "parameters": {"type": "object", "properties": []}}}],
              [{"type": "function", "function": {"name": "a", "parameters": {"properties": {"x": 5}}}}],
              [{"type": "function", "function": {"name": "a", "parameters": {"required": "x"}}}],
              [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}]],
    "tool_choice": ["sometimes", 5, {"type": "function"}, {"type": "function", "function": {"name": "ghost"}},
                    "required", "auto"],  # no tools given: any tool_choice but "none" is an error
    "response_format": [{"type": "json_schema"}, {"type": "yaml"}, "json",
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}],
    "reasoning_effort": ["extreme", 3, ""],
    "chat_template": ["{{ messages }}", "{% for x in range(10**9) %}x{% endfor %}"],
    "chat_template_kwargs": ["x", 5, [], {"enable_thinking": "no"}, {"low_effort": 1},
                             {"messages": []}, {"add_generation_prompt": False}, {"max_thinking_tokens": -5},
                             {"max_thinking_tokens": "lots"}, {"force_nonempty_content": "true"}],
    "max_thinking_tokens": [-1, "10", 1.5, *HUGE],
    "max_completion_tokens": [-1, 0, 10**9, "8"],
}
COMPLETION_BAD = {
    "prompt": [None, 5, {}, [], [[]], [-1], [0, 2**40], [4096], [10**12], [0, "a"], [[1, 2], "x"], [1.5],
               [[-3]], "word " * 3000, ["a"] * 129, [list(range(300))], True],
    "logprobs": [-1, 21, "5", True, 1.5],
    "echo": NOT_BOOL,
    "suffix": ["tail"],
    "best_of": [0, 3, -1, "2"],
    "max_tokens": [300, 10**6],  # prompt + max_tokens over the 256-token context
}


def _corpus() -> list[tuple[str, str, dict, bytes]]:
    cases: list[tuple[str, str, dict, bytes]] = []

    def add(path: str, body, headers: dict | None = None, method: str = "POST") -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
        cases.append((method, path, headers or AUTH, raw))

    for path, base, extra in (("/v1/chat/completions", CHAT, CHAT_BAD), ("/v1/completions", COMPLETION, COMPLETION_BAD)):
        for field, values in {**SAMPLING_BAD, **extra}.items():
            for value in values:
                add(path, {**base, field: value})
        for field in base:  # each required field missing (model is optional)
            if field != "model" and field != "max_tokens":
                add(path, {k: v for k, v in base.items() if k != field})
        raw_bodies = [b"", b"{", b"{not json}", b"[]", b"null", b"123", b'"text"', b"\xff\xfe\xfd",
                      b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', b'{"prompt": "\xc3\x28"}',
                      b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
                      json.dumps({**base, "temperature": float("nan")}, allow_nan=True).encode(),
                      json.dumps({**base, "top_p": float("inf")}, allow_nan=True).encode(),
                      b'{"model": "nemoh-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e999}',
                      b"\x00" * 1000, "{\"prompt\": \"\u0000\"".encode()]
        for raw in raw_bodies:
            add(path, raw)
        nested = b'{"k":' * 3000 + b'"x"' + b"}" * 3000
        add(path, json.dumps({**base, "n": 0}).encode()[:-1] + b', "chat_template_kwargs": ' + nested + b"}")
        add(path, json.dumps(base).encode()[:-1] + b', "extra_field": ' + b"[" * 900 + b"]" * 900 + b"}")
        add(path, base, headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "text/plain"})
        add(path, base, headers={"Content-Type": "application/json"})  # no key
        add(path, base, headers={"Authorization": "Bearer " + "k" * 5000, "Content-Type": "application/json"})
        add(path, base, headers={**AUTH, "X-Huge": "h" * 20_000})  # 431 from the guard
        add(path, b'{"prompt": "' + b"x" * (9 * 1024 * 1024) + b'"}')  # 413 (8 MiB limit)
        add(path, base, method="GET")
        add(path, base, method="PUT")
    for path in ("/v1/models", "/tokenize", "/detokenize"):
        add(path, {"tokens": [-1]} if path == "/detokenize" else {"prompt": 5}, method="POST" if path != "/v1/models" else "DELETE")
    add("/detokenize", {"tokens": [10**9]})
    add("/detokenize", {"tokens": "abc"})
    add("/tokenize", {"prompt": "a", "messages": CHAT["messages"]})
    add("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 1 }}"})
    add("/v2/chat/completions", CHAT)
    add("/v1/../../etc/passwd", CHAT, method="GET")
    # Random single-field corruption of valid requests with values that are never valid there.
    rng = random.Random(1234)
    pool = [(p, b, f, v) for p, b, extra in (("/v1/chat/completions", CHAT, CHAT_BAD),
                                             ("/v1/completions", COMPLETION, COMPLETION_BAD))
            for f, vs in {**SAMPLING_BAD, **extra}.items() for v in vs]
    for _ in range(150):
        (p1, b1, f1, v1), (_, _, f2, v2) = rng.sample([x for x in pool if x[0] == "/v1/chat/completions"], 2) \
            if rng.random() < 0.5 else rng.sample([x for x in pool if x[0] == "/v1/completions"], 2)
        add(p1, {**b1, f1: v1, f2: v2})
    return cases


def _raw_request(host: str, port: int, data: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_hostile_corpus_gets_only_4xx(real_server):
    base = real_server.base_url
    with httpx.Client(timeout=10) as client:
        before = client.post(base + "/v1/completions", headers=AUTH, json=GREEDY).json()["choices"][0]["text"]
        cases = _corpus()
        assert len(cases) >= 500
        statuses: dict[int, int] = {}
        slowest = 0.0
        for method, path, headers, body in cases:
            t = time.perf_counter()
            r = client.request(method, base + path, headers=headers, content=body)
            elapsed = time.perf_counter() - t
            slowest = max(slowest, elapsed)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert 400 <= r.status_code < 500, (path, body[:200], r.status_code, r.text[:300])
            assert elapsed < 1.0, (path, body[:200], elapsed)
            err = r.json()["error"]
            assert isinstance(err["message"], str) and err["type"]
        # Header floods and malformed request lines, sent raw (h11's limits and errors).
        raw_cases = [
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Flood: " + b"a" * 200_000 + b"\r\n\r\n",
            b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(20_000)) + b"\r\n",
            b"NOT HTTP AT ALL\r\n\r\n",
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ]
        for data in raw_cases:
            t = time.perf_counter()
            reply = _raw_request(real_server.host, real_server.port, data)
            assert time.perf_counter() - t < 1.0
            status = int(reply.split(b" ", 2)[1])
            assert 400 <= status < 500, reply[:200]
            statuses[status] = statuses.get(status, 0) + 1
        print(f"\nfuzz: {len(cases) + len(raw_cases)} hostile requests, statuses {dict(sorted(statuses.items()))}, "
              f"slowest {slowest * 1000:.0f} ms")
        assert statuses.get(431, 0) >= 3 and statuses.get(413, 0) >= 2 and statuses.get(401, 0) >= 2
        assert client.get(base + "/health").status_code == 200
        after = client.post(base + "/v1/completions", headers=AUTH, json=GREEDY).json()["choices"][0]["text"]
        assert after == before

"""The server over the real engine on a tiny random checkpoint, driven by the official openai client.

Random weights make the text noise, so these tests check structure, determinism, accounting and resource
release; the parser-level behaviour is in test_chat_scripted.py.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import openai
import pytest

from server_helpers import API_KEY, MODEL_NAME, real_engine, start_server, stop_real

AUTH = {"Authorization": f"Bearer {API_KEY}"}
USER = [{"role": "user", "content": "My VPN is down, what should I do?"}]
GREEDY = dict(temperature=0.0, max_tokens=8)


def tokenize(server, **body) -> dict:
    r = httpx.post(f"{server.base_url}/tokenize", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_stream_and_not_agree(real_server):
    c = real_server.client()
    r = c.chat.completions.create(model=MODEL_NAME, messages=USER, **GREEDY)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.created > 1_600_000_000
    assert r.model == MODEL_NAME and r.choices[0].finish_reason in ("stop", "length")
    m = r.choices[0].message
    assert r.usage.prompt_tokens == tokenize(real_server, messages=USER)["count"]
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(c.chat.completions.create(model=MODEL_NAME, messages=USER, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    reasoning = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices)
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert (reasoning or None, content or None) == (m.reasoning_content, m.content)
    assert len({ch.id for ch in chunks}) == 1 and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == r.usage.completion_tokens_details.reasoning_tokens


def test_completions_stream_and_not_agree(real_server):
    c = real_server.client()
    r = c.completions.create(model=MODEL_NAME, prompt="The printer on floor 3", **GREEDY)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    text = "".join(ch.choices[0].text for ch in c.completions.create(model=MODEL_NAME, prompt="The printer on floor 3",
                                                                   stream=True, **GREEDY) if ch.choices)
    assert text == r.choices[0].text
    echo = c.completions.create(model=MODEL_NAME, prompt="The printer on floor 3", echo=True, **GREEDY)
    assert echo.choices[0].text == "The printer on floor 3" + r.choices[0].text
    ids = tokenize(real_server, prompt="The printer on floor 3")["tokens"]
    by_ids = c.completions.create(model=MODEL_NAME, prompt=ids, **GREEDY)
    assert by_ids.choices[0].text == r.choices[0].text


def test_batch_n_seed_stop_and_logprobs(real_server):
    c = real_server.client()
    r = c.completions.create(model=MODEL_NAME, prompt=["a", "b"], n=2, max_tokens=4, seed=7, logprobs=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    again = c.completions.create(model=MODEL_NAME, prompt=["a", "b"], n=2, max_tokens=4, seed=7, logprobs=3)
    assert [ch.text for ch in r.choices] == [ch.text for ch in again.choices]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 3 for t in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    chat = c.chat.completions.create(model=MODEL_NAME, messages=USER, logprobs=True, top_logprobs=2, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    greedy_text = c.completions.create(model=MODEL_NAME, prompt="x", temperature=0, max_tokens=12).choices[0].text
    stop = greedy_text[3:6]
    if stop.strip():
        cut = c.completions.create(model=MODEL_NAME, prompt="x", temperature=0, max_tokens=12, stop=[stop])
        assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"


def test_return_tokens_as_token_ids(real_server):
    """vLLM's --return-tokens-as-token-ids: logprob tokens are "token_id:N", N the id of the token whose text is
    returned without the flag."""
    c = real_server.client()
    settings = real_server.state.settings
    plain = c.completions.create(model=MODEL_NAME, prompt="The printer", logprobs=2, **GREEDY).choices[0].logprobs
    settings.return_tokens_as_token_ids = True
    try:
        lp = c.completions.create(model=MODEL_NAME, prompt="The printer", logprobs=2, **GREEDY).choices[0].logprobs
        chat = c.chat.completions.create(model=MODEL_NAME, messages=USER, logprobs=True, top_logprobs=2, **GREEDY)
    finally:
        settings.return_tokens_as_token_ids = False
    assert all(re.fullmatch(r"token_id:\d+", t) for t in lp.tokens)
    tokenizer = real_server.engine.tokenizer
    assert [tokenizer.decode([int(t[9:])], skip_special_tokens=False) for t in lp.tokens] == plain.tokens
    assert all(re.fullmatch(r"token_id:\d+", k) for top in lp.top_logprobs for k in top)
    content = chat.choices[0].logprobs.content
    assert content and all(re.fullmatch(r"token_id:\d+", t.token) for t in content)
    assert all(re.fullmatch(r"token_id:\d+", t.token) for e in content for t in e.top_logprobs)


def test_thinking_switches_shape_the_prompt(real_server):
    on = tokenize(real_server, messages=USER)["prompt"]
    off = tokenize(real_server, messages=USER, chat_template_kwargs={"enable_thinking": False})["prompt"]
    low = tokenize(real_server, messages=USER, reasoning_effort="low")["prompt"]
    assert on.endswith("<|im_start|>assistant\n<think>\n")
    assert off.endswith("<|im_start|>assistant\n<think></think>")
    assert low.endswith("<|im_start|>assistant\n<think>\n") and low != on
    c = real_server.client()
    r_off = c.chat.completions.create(model=MODEL_NAME, messages=USER, reasoning_effort="none", **GREEDY)
    assert r_off.choices[0].message.reasoning_content is None
    assert r_off.usage.completion_tokens_details.reasoning_tokens == 0
    assert r_off.usage.prompt_tokens == tokenize(real_server, messages=USER, reasoning_effort="none")["count"]


def test_cut_inside_reasoning(real_server):
    c = real_server.client()
    r = c.chat.completions.create(model=MODEL_NAME, messages=USER, temperature=0, max_tokens=3)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "length"
    assert m.content is None and m.reasoning_content
    assert r.usage.completion_tokens_details.reasoning_tokens == 3
    forced = c.chat.completions.create(model=MODEL_NAME, messages=USER, temperature=0, max_tokens=3,
                                       extra_body={"chat_template_kwargs": {"force_nonempty_content": True}})
    assert forced.choices[0].message.content == m.reasoning_content


def test_thinking_budget_with_the_real_engine(real_server):
    c = real_server.client()
    r = c.chat.completions.create(model=MODEL_NAME, messages=USER, temperature=0, max_tokens=10,
                                  extra_body={"max_thinking_tokens": 3})
    m = r.choices[0].message
    assert m.reasoning_content and m.content  # the think block was closed after 3 tokens; the answer came
    assert r.usage.completion_tokens == 10


def wait_idle(engine, timeout: float = 1.0) -> float:
    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        s = engine.stats()
        if s["num_running"] == 0 and s["kv_blocks_used"] == 0 and s["mamba_slots_used"] == 0 \
                and s["num_unfinished_requests"] == 0:
            return time.perf_counter() - t
        time.sleep(0.01)
    raise AssertionError(f"engine not idle {timeout} s after the client left: {engine.stats()}")


def test_disconnect_frees_the_engine_within_a_second(real_server):
    engine = real_server.engine
    for path, body in (("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "hello"})):
        with httpx.stream("POST", real_server.base_url + path, headers=AUTH,
                          json={**body, "max_tokens": 200, "stream": True}) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: {")
                if seen == 3:
                    assert engine.stats()["kv_blocks_used"] > 0
                    break  # closes the connection
        assert wait_idle(engine) < 1.0
    # a non-streaming request whose client goes away while it runs (a raw socket: the engine is too fast
    # on this model for a client-side timeout to land reliably mid-request)
    body = json.dumps({"prompt": "hello", "max_tokens": 240, "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {real_server.host}\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection((real_server.host, real_server.port))
    sock.sendall(head + body)
    deadline = time.perf_counter() + 5.0
    while engine.stats()["num_running"] == 0:
        assert time.perf_counter() < deadline, "the request never started"
        time.sleep(0.001)
    sock.close()
    assert wait_idle(engine) < 1.0


def test_metrics_exposed(real_server):
    c = real_server.client()
    c.completions.create(model=MODEL_NAME, prompt="metrics please", max_tokens=6, temperature=0)
    text = httpx.get(real_server.base_url + "/metrics", headers=AUTH).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)

    def get(prefix: str) -> float:
        return next(v for k, v in values.items() if k.startswith(prefix))

    for name in ("nemoh:num_requests_running", "nemoh:num_requests_waiting", "nemoh:kv_cache_usage_perc",
                 "nemoh:mamba_cache_usage_perc"):
        assert name in values
    assert get("nemoh:prompt_tokens_total") > 0 and get("nemoh:generation_tokens_total") >= 6
    assert get("nemoh:time_to_first_token_seconds_count") > 0
    assert get("nemoh:inter_token_latency_seconds_count") > 0
    assert get("nemoh:spec_decode_num_draft_tokens_total") > 0
    assert "nemoh:spec_decode_num_accepted_tokens_total" in values
    assert httpx.get(real_server.base_url + "/metrics").status_code == 401


def test_queue_full_and_recovery(tiny_checkpoint):
    # long enough that the held requests outlast the test on a fast machine (~1 ms a token here)
    engine = real_engine(tiny_checkpoint, max_num_seqs=1, max_waiting_requests=1, max_model_len=8192,
                         num_kv_blocks=1100)
    server = start_server(engine)
    try:
        streams = []
        stop = threading.Event()

        def hold(i: int) -> None:  # keep a long request streaming until told to stop
            with httpx.stream("POST", server.base_url + "/v1/completions", headers=AUTH,
                              json={"prompt": f"hold {i}", "max_tokens": 8000, "ignore_eos": True,
                                    "stream": True}) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        break

        for i in range(2):  # one running, one waiting
            t = threading.Thread(target=hold, args=(i,), daemon=True)
            t.start()
            streams.append(t)
            deadline = time.time() + 5
            while engine.stats()["num_running"] + engine.stats()["num_waiting"] < i + 1 and time.time() < deadline:
                time.sleep(0.02)
        for stream in (False, True):
            t = time.perf_counter()
            r = httpx.post(server.base_url + "/v1/completions", headers=AUTH,
                           json={"prompt": "one too many", "max_tokens": 4, "stream": stream})
            assert time.perf_counter() - t < 0.5
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            server.client().completions.create(model=MODEL_NAME, prompt="x", max_tokens=2)
        stop.set()
        for t in streams:
            t.join(10)
        wait_idle(engine, 3.0)
        r = server.client().completions.create(model=MODEL_NAME, prompt="x", max_tokens=2)
        assert r.usage.completion_tokens == 2
    finally:
        stop_real(server)

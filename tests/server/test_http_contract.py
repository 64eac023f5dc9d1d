"""HTTP-level contract: auth on every route, error shapes and statuses, size limits, CORS, drain, isolation."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from server_fakes import ScriptedEngine
from server_helpers import API_KEY, MODEL_NAME

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
ROUTES = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
          ("GET", "/metrics"), ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/openapi.json"),
          ("GET", "/no/such/route")]


@pytest.fixture
def server(server_factory, demo_tokenizer):
    return server_factory(ScriptedEngine(demo_tokenizer, script="ok"))


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_api_key_on_every_route_but_health(server):
    for method, path in ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                        {"Authorization": f"Basic {API_KEY}"}):
            r = httpx.request(method, server.base_url + path, headers=headers, json=CHAT)
            assert_openai_error(r, 401)
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(server.base_url + "/v1/models", headers={"X-API-Key": API_KEY}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="nope").models.list()
    assert [m.id for m in server.client().models.list().data] == [MODEL_NAME]


def test_api_docs_like_vllm_and_behind_the_key(server, server_factory, demo_tokenizer):
    """FastAPI's /docs, /redoc and /openapi.json, as vLLM serves them; with an API key they need it too."""
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert_openai_error(httpx.get(server.base_url + path), 401)
        assert httpx.get(server.base_url + path, headers=AUTH).status_code == 200
    paths = httpx.get(server.base_url + "/openapi.json", headers=AUTH).json()["paths"]
    assert "/v1/chat/completions" in paths and "/v1/completions" in paths
    open_server = server_factory(ScriptedEngine(demo_tokenizer, script="ok"), api_key=None)
    assert "swagger-ui" in httpx.get(open_server.base_url + "/docs").text
    off = server_factory(ScriptedEngine(demo_tokenizer, script="ok"), api_docs=False)
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert_openai_error(httpx.get(off.base_url + path, headers=AUTH), 404)


def test_error_statuses(server):
    url = server.base_url
    err = assert_openai_error(httpx.post(url + "/v1/chat/completions", headers=AUTH,
                                         json={**CHAT, "model": "gpt-4"}), 404)
    assert err["code"] == "model_not_found"
    err = assert_openai_error(httpx.post(url + "/v1/chat/completions", headers=AUTH,
                                         json={**CHAT, "max_tokens": -3}), 400)
    assert err["param"] == "max_tokens" and err["type"] == "invalid_request_error"
    err = assert_openai_error(httpx.post(url + "/v1/chat/completions", headers=AUTH,
                                         json={**CHAT, "max_tokens": 10**6}), 400)
    assert err["code"] == "context_length_exceeded" and "2048" in err["message"]
    long_prompt = {"model": MODEL_NAME, "prompt": "word " * 3000}
    err = assert_openai_error(httpx.post(url + "/v1/completions", headers=AUTH, json=long_prompt), 400)
    assert "2048" in err["message"] and "3000" in err["message"] or "tokens" in err["message"]
    assert_openai_error(httpx.post(url + "/v1/chat/completions", headers=AUTH, content=b"{not json"), 400)
    assert_openai_error(httpx.get(url + "/v1/chat/completions", headers=AUTH), 405)
    assert_openai_error(httpx.post(url + "/v1/completions", headers=AUTH,
                                   json={"model": MODEL_NAME, "prompt": [0, 1, 999999]}), 400)
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=MODEL_NAME, messages=[{"role": "wizard", "content": "x"}])


def test_body_and_header_limits(server_factory, demo_tokenizer):
    s = server_factory(ScriptedEngine(demo_tokenizer, script="ok"), max_body_bytes=64 * 1024,
                       max_header_bytes=8 * 1024)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 100_000}]}
    assert_openai_error(httpx.post(s.base_url + "/v1/chat/completions", headers=AUTH, json=big), 413)

    def chunks():  # no Content-Length: the limit applies to the bytes received
        yield b'{"model": "nemoh-test", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}]}'

    assert_openai_error(httpx.post(s.base_url + "/v1/chat/completions", headers=AUTH, content=chunks()), 413)
    r = httpx.get(s.base_url + "/health", headers={"X-Big": "y" * 20_000})
    assert_openai_error(r, 431)
    assert httpx.get(s.base_url + "/health").status_code == 200


def test_cors_closed_by_default(server_factory, demo_tokenizer, server):
    pre = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(server.base_url + "/v1/chat/completions", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    s = server_factory(ScriptedEngine(demo_tokenizer), allowed_origins=["https://app.example"])
    r = httpx.options(s.base_url + "/v1/chat/completions",
                      headers={**pre, "Origin": "https://app.example"})
    assert r.headers.get("access-control-allow-origin") == "https://app.example"
    r = httpx.options(s.base_url + "/v1/chat/completions", headers=pre)
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"


def test_queue_full_is_429_with_retry_after(server_factory, demo_tokenizer):
    s = server_factory(ScriptedEngine(demo_tokenizer, max_running=0))
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", {"prompt": "hi", "max_tokens": 3})):
        for stream in (False, True):
            t = time.perf_counter()
            r = httpx.post(s.base_url + path, headers=AUTH, json={**body, "stream": stream})
            assert time.perf_counter() - t < 0.5
            assert_openai_error(r, 429)
            assert int(r.headers["retry-after"]) >= 1


def test_draining_and_dead_engine_are_503(server):
    server.state.draining = True
    try:
        r = httpx.post(server.base_url + "/v1/chat/completions", headers=AUTH, json=CHAT)
        assert_openai_error(r, 503)
        assert "retry-after" in r.headers
        assert httpx.get(server.base_url + "/health").status_code == 503
    finally:
        server.state.draining = False
    server.engine.healthy = False
    assert httpx.get(server.base_url + "/health").status_code == 503
    server.engine.healthy = True
    assert httpx.get(server.base_url + "/health").status_code == 200


class FaultyEngine(ScriptedEngine):
    """Fails any request whose prompt contains the word 'boom'."""

    async def generate(self, prompt_token_ids, sampling_params, request_id, prompt=None):
        if "boom" in self.tokenizer.decode(prompt_token_ids):
            raise RuntimeError("injected fault")
        async for out in super().generate(prompt_token_ids, sampling_params, request_id, prompt):
            yield out


def test_a_failing_request_fails_alone(server_factory, demo_tokenizer):
    s = server_factory(FaultyEngine(demo_tokenizer, script="fine"))
    boom = {**CHAT, "messages": [{"role": "user", "content": "boom"}]}
    for stream in (False, True):
        err = assert_openai_error(httpx.post(s.base_url + "/v1/chat/completions", headers=AUTH,
                                             json={**boom, "stream": stream}), 500)
        assert err["type"] == "server_error"
    r = s.client().chat.completions.create(**CHAT, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content == "fine"
    assert httpx.get(s.base_url + "/health").status_code == 200


def test_disconnect_mid_stream_aborts_the_engine_request(server_factory, demo_tokenizer):
    engine = ScriptedEngine(demo_tokenizer, script="tick " * 400, delay=0.01)
    s = server_factory(engine)
    for path, body in (("/v1/chat/completions", {**CHAT, "max_tokens": 500}),
                       ("/v1/completions", {"prompt": "x", "max_tokens": 500})):
        with httpx.stream("POST", s.base_url + path, headers=AUTH, json={**body, "stream": True}) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: {")
                if seen == 3:
                    assert engine.running
                    break  # leaving iter_lines() closes the connection
        t = time.perf_counter()
        while engine.running and time.perf_counter() - t < 1.0:
            time.sleep(0.01)
        assert not engine.running, "the engine request outlived its client by more than 1 s"
        assert engine.abort_calls  # the server aborted it explicitly too, not only by cancellation


def test_disconnect_while_waiting_non_streaming(server_factory, demo_tokenizer):
    engine = ScriptedEngine(demo_tokenizer, script="tick " * 400, delay=0.01)
    s = server_factory(engine)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(s.base_url + "/v1/completions", headers=AUTH, json={"prompt": "x", "max_tokens": 500},
                   timeout=0.3)
    t = time.perf_counter()
    while engine.running and time.perf_counter() - t < 1.0:
        time.sleep(0.01)
    assert not engine.running


def test_sse_format_and_done(server):
    with httpx.stream("POST", server.base_url + "/v1/completions", headers=AUTH,
                      json={"prompt": "hi", "max_tokens": 5, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] >= 1
    assert any(p["choices"] and p["choices"][0]["finish_reason"] for p in payloads)


def test_responses_are_sent_without_nagle_delay(server):
    """Every connection has TCP_NODELAY, even on a listening socket made without the TCP protocol number (as
    this test's is): without it a keep-alive response written as headers + body waited for the client's
    delayed ACK, 40 ms per request."""
    import socket

    with httpx.Client(base_url=server.base_url) as client:
        assert client.get("/health").status_code == 200
        connections = list(server.thread.server.server_state.connections)
        socks = [c.transport.get_extra_info("socket") for c in connections]
        assert socks and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in socks)

"""Structured output through the HTTP API on the real engine with random weights (MTP speculative decoding on):
whatever the weights say, `required` / named choices call offered tools with valid arguments, `json_schema` replies
validate, reasoning stays free, and bad schemas are a 400 naming the field."""
from __future__ import annotations

import json

import httpx
import jsonschema_rs
import pytest

from nemoh.chat import ChatTemplate
from server_helpers import API_KEY, MODEL_NAME, real_engine, start_server, stop_real

AUTH = {"Authorization": f"Bearer {API_KEY}"}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
NO_THINK = {"enable_thinking": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {
        "ids": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3},
        "exact": {"type": "boolean"}}, "required": ["ids"]}}},
]
SCHEMA = {"type": "object", "properties": {
    "ünïcode kéy": {"type": "string", "maxLength": 5}, "score": {"type": "number", "minimum": 0, "maximum": 1},
    "choice": {"anyOf": [{"enum": ["a", "b"]}, {"type": "integer", "minimum": 0, "maximum": 3}]},
    "items": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"],
                                         "additionalProperties": False}, "minItems": 1, "maxItems": 2}},
    "required": ["ünïcode kéy", "choice", "items"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    """The real engine with MTP speculative decoding, with room for tool prompts and long replies."""
    engine = real_engine(tiny_checkpoint, max_model_len=1024, num_kv_blocks=160,
                         speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    s = start_server(engine, chat_template=ChatTemplate.from_model_dir(tiny_checkpoint),
                     enable_auto_tool_choice=True, model_path=str(tiny_checkpoint))
    yield s
    stop_real(s)


def post(server, **body) -> httpx.Response:
    body.setdefault("model", MODEL_NAME)
    body.setdefault("messages", USER)
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)


def stream(server, **body) -> tuple[list[dict], str | None]:
    """(tool calls reassembled from the chunks, finish_reason)."""
    body.update(model=MODEL_NAME, messages=body.get("messages", USER), stream=True)
    calls: dict[int, dict] = {}
    finish = None
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                for tc in choice["delta"].get("tool_calls") or []:
                    entry = calls.setdefault(tc["index"], {"name": None, "arguments": ""})
                    entry["name"] = entry["name"] or tc["function"].get("name")
                    entry["arguments"] += tc["function"].get("arguments") or ""
                finish = choice.get("finish_reason") or finish
    return [calls[i] for i in sorted(calls)], finish


def check_calls(calls, names=None):
    validators = {t["function"]["name"]: jsonschema_rs.validator_for(t["function"]["parameters"]) for t in TOOLS}
    assert calls
    for c in calls:
        name = c["function"]["name"] if "function" in c else c["name"]
        args = c["function"]["arguments"] if "function" in c else c["arguments"]
        assert name in (names or validators) and validators[name].is_valid(json.loads(args)), c


@pytest.mark.parametrize("seed", range(4))
def test_required_calls_offered_tools_with_valid_arguments(server, seed):
    r = post(server, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed, max_tokens=200,
             chat_template_kwargs=NO_THINK)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    check_calls(choice["message"]["tool_calls"])


def test_named_choice_and_one_call_when_not_parallel(server):
    named = {"type": "function", "function": {"name": "lookup"}}
    for seed in range(3):
        r = post(server, tools=TOOLS, tool_choice=named, temperature=1.0, seed=seed, max_tokens=200,
                 parallel_tool_calls=False, chat_template_kwargs=NO_THINK)
        calls = r.json()["choices"][0]["message"]["tool_calls"]
        assert len(calls) == 1
        check_calls(calls, names={"lookup"})


def test_streamed_required_calls_end_with_tool_calls(server):
    calls, finish = stream(server, tools=TOOLS, tool_choice="required", temperature=1.0, seed=11,
                           max_tokens=200, chat_template_kwargs=NO_THINK)
    assert finish == "tool_calls"
    check_calls(calls)


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_replies_validate(server, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    r = post(server, response_format=fmt, temperature=1.0, seed=seed, max_tokens=200,
             chat_template_kwargs=NO_THINK)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    assert jsonschema_rs.validator_for(SCHEMA).is_valid(json.loads(content)), content


@pytest.mark.parametrize("streamed", [False, True])
def test_a_reply_cut_by_max_tokens_is_a_length_reply_with_the_text_so_far(server, streamed):
    """The real engine stopping a constrained reply at max_tokens: no error, finish_reason "length", the text so
    far as content (JSON cut short, as OpenAI returns it). Streamed: the same text and finish."""
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}
    body = dict(response_format=fmt, temperature=1.0, seed=3, max_tokens=3, chat_template_kwargs=NO_THINK)
    r = post(server, **body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["message"]["content"]
    assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 3
    assert content.lstrip().startswith("{"), content
    with pytest.raises(ValueError):
        json.loads(content)
    if streamed:
        text, finish = "", None
        body.update(model=MODEL_NAME, messages=USER, stream=True)
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as s:
            for line in s.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for c in json.loads(line[6:])["choices"]:
                        text += c["delta"].get("content") or ""
                        finish = c.get("finish_reason") or finish
        assert (text, finish) == (content, "length")


def test_reasoning_stays_free_and_the_budget_still_applies(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    r = post(server, response_format=fmt, temperature=1.0, seed=5, max_tokens=220, max_thinking_tokens=12)
    message = r.json()["choices"][0]["message"]
    assert message["reasoning_content"]                                   # thinking on: reasoning kept
    assert r.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] <= 14
    assert jsonschema_rs.validator_for(SCHEMA).is_valid(json.loads(message["content"])), message


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(unclosed"}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(30_000)}}}}},
     "response_format.json_schema.schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": "zero"}}}}}], "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": "required", "min_tokens": 3}, "min_tokens"),
])
def test_bad_constraints_are_a_400_naming_the_field(server, body, param):
    r = post(server, max_tokens=5, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert post(server, max_tokens=2).status_code == 200                 # the engine is fine after


def test_auto_with_a_schema_the_library_refuses_stays_unconstrained(server):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"not": {"type": "string"}}}}}}]
    r = post(server, tools=tools, tool_choice="auto", max_tokens=4, chat_template_kwargs=NO_THINK)
    assert r.status_code == 200, r.text

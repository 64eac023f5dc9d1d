"""Chat-contract behaviour through a real HTTP server and the official openai client, with a scripted engine.

The scripted engine "generates" a fixed text (tokenized with the demo tokenizer), so the reasoning and tool
parsers can be checked end to end, streaming and not, without depending on a trained model.
"""
from __future__ import annotations

import json

import httpx
import pytest

from server_fakes import ScriptedEngine
from server_helpers import API_KEY, MODEL_NAME

TOOLS = [
    {"type": "function", "function": {"name": "lookup_user", "description": "Find a user by email.",
                                      "parameters": {"type": "object", "properties": {"email": {"type": "string"}},
                                                     "required": ["email"]}}},
    {"type": "function", "function": {"name": "create_ticket", "description": "Open a ticket.",
                                      "parameters": {"type": "object", "properties": {
                                          "title": {"type": "string"}, "priority": {"type": "integer"}}}}},
]
USER = [{"role": "user", "content": "help"}]

TWO_CALLS = (
    "I should look the user up and open a ticket.\n</think>\n"
    "<tool_call>\n<function=lookup_user>\n<parameter=email>\nana@example.com\n</parameter>\n</function>\n</tool_call>\n"
    "<tool_call>\n<function=create_ticket>\n<parameter=title>\nVPN down\n</parameter>\n"
    "<parameter=priority>\n2\n</parameter>\n</function>\n</tool_call>"
)
CALL_IN_REASONING = (
    "Need to look up the user.\n"
    "<tool_call>\n<function=lookup_user>\n<parameter=email>\nbob@example.com\n</parameter>\n</function>\n</tool_call>"
)
MALFORMED = "Thinking.\n</think>\n<tool_call>\n<function=delete_everything>\n</function>\n</tool_call>"


def serve(server_factory, tokenizer, script, **settings):
    settings.setdefault("enable_auto_tool_choice", True)
    return server_factory(ScriptedEngine(tokenizer, script=script), **settings)


def collect_stream(stream):
    role, reasoning, content, finish, usage = None, "", "", None, None
    calls: dict[int, dict] = {}
    order: list[tuple[int, str]] = []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            d = choice.delta
            role = role or d.role
            reasoning += getattr(d, "reasoning_content", None) or ""
            content += d.content or ""
            for tc in d.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    call["id"] = tc.id
                if tc.function and tc.function.name:
                    call["name"] += tc.function.name
                    order.append((tc.index, "name"))
                if tc.function and tc.function.arguments:
                    call["arguments"] += tc.function.arguments
                    order.append((tc.index, "arguments"))
            if choice.finish_reason:
                finish = choice.finish_reason
    return dict(role=role, reasoning=reasoning or None, content=content or None, finish=finish, usage=usage,
                calls=[calls[i] for i in sorted(calls)], order=order)


def test_reasoning_split_stream_and_not(server_factory, demo_tokenizer):
    s = serve(server_factory, demo_tokenizer, "Two plus two.\n</think>\nIt is 4.")
    c = s.client()
    r = c.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=100)
    m = r.choices[0].message
    assert m.reasoning_content == "Two plus two." and m.content == "It is 4."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens_details.reasoning_tokens > 0
    assert r.usage.completion_tokens > r.usage.completion_tokens_details.reasoning_tokens
    got = collect_stream(c.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=100, stream=True,
                                                   stream_options={"include_usage": True}))
    assert got["role"] == "assistant"
    assert (got["reasoning"], got["content"], got["finish"]) == ("Two plus two.", "It is 4.", "stop")
    assert got["usage"].completion_tokens == r.usage.completion_tokens
    assert got["usage"].completion_tokens_details.reasoning_tokens == r.usage.completion_tokens_details.reasoning_tokens


def test_thinking_off_everything_is_content(server_factory, demo_tokenizer):
    s = serve(server_factory, demo_tokenizer, "Plain answer.")
    c = s.client()
    for effort_args in ({"reasoning_effort": "none"}, {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}):
        r = c.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=50, **effort_args)
        assert r.choices[0].message.content == "Plain answer."
        assert r.choices[0].message.reasoning_content is None
        assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_cut_inside_reasoning_and_force_nonempty_content(server_factory, demo_tokenizer):
    s = serve(server_factory, demo_tokenizer, "a long line of reasoning that never ends " * 5)
    c = s.client()
    r = c.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=6)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content is None and r.choices[0].message.reasoning_content
    for stream in (False, True):
        kwargs = dict(model=MODEL_NAME, messages=USER, max_tokens=6,
                      extra_body={"chat_template_kwargs": {"force_nonempty_content": True}})
        if stream:
            got = collect_stream(c.chat.completions.create(stream=True, **kwargs))
            assert got["content"] and got["content"] == got["reasoning"]
        else:
            m = c.chat.completions.create(**kwargs).choices[0].message
            assert m.content and m.content == m.reasoning_content


def test_two_tool_calls_stream_and_not(server_factory, demo_tokenizer):
    s = serve(server_factory, demo_tokenizer, TWO_CALLS)
    c = s.client()
    r = c.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.reasoning_content == "I should look the user up and open a ticket."
    calls = choice.message.tool_calls
    assert [tc.function.name for tc in calls] == ["lookup_user", "create_ticket"]
    assert json.loads(calls[0].function.arguments) == {"email": "ana@example.com"}
    assert json.loads(calls[1].function.arguments) == {"title": "VPN down", "priority": 2}
    assert all(tc.id and tc.type == "function" for tc in calls) and calls[0].id != calls[1].id

    got = collect_stream(c.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, max_tokens=200,
                                                   stream=True))
    assert got["finish"] == "tool_calls" and got["content"] is None
    assert [x["name"] for x in got["calls"]] == ["lookup_user", "create_ticket"]
    assert [json.loads(x["arguments"]) for x in got["calls"]] == [json.loads(tc.function.arguments) for tc in calls]
    assert all(x["id"] for x in got["calls"])
    for index in (0, 1):  # the name comes before the argument fragments of the same call
        kinds = [k for i, k in got["order"] if i == index]
        assert kinds[0] == "name" and "arguments" in kinds


def test_tool_call_inside_reasoning_is_recovered(server_factory, demo_tokenizer):
    s = serve(server_factory, demo_tokenizer, CALL_IN_REASONING)
    c = s.client()
    r = c.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, max_tokens=200)
    assert r.choices[0].finish_reason == "tool_calls"
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "lookup_user" and json.loads(call.function.arguments) == {"email": "bob@example.com"}
    assert "<tool_call>" not in (r.choices[0].message.reasoning_content or "")
    got = collect_stream(c.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, max_tokens=200,
                                                   stream=True))
    assert got["finish"] == "tool_calls" and [x["name"] for x in got["calls"]] == ["lookup_user"]


def test_malformed_or_unknown_call_stays_content(server_factory, demo_tokenizer):
    s = serve(server_factory, demo_tokenizer, MALFORMED)
    c = s.client()
    for stream in (False, True):
        kwargs = dict(model=MODEL_NAME, messages=USER, tools=TOOLS, max_tokens=200)
        if stream:
            got = collect_stream(c.chat.completions.create(stream=True, **kwargs))
            content, calls, finish = got["content"], got["calls"], got["finish"]
        else:
            choice = c.chat.completions.create(**kwargs).choices[0]
            content, calls, finish = choice.message.content, choice.message.tool_calls, choice.finish_reason
        assert "delete_everything" in content and not calls and finish == "stop"


def test_tool_choice_none_does_not_parse(server_factory, demo_tokenizer):
    s = serve(server_factory, demo_tokenizer, TWO_CALLS)
    r = s.client().chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice="none",
                                           max_tokens=200)
    assert not r.choices[0].message.tool_calls and "<tool_call>" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"


def test_named_tool_choice_keeps_only_that_function(server_factory, demo_tokenizer):
    s = serve(server_factory, demo_tokenizer, TWO_CALLS)
    r = s.client().chat.completions.create(
        model=MODEL_NAME, messages=USER, tools=TOOLS, max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "create_ticket"}})
    assert [tc.function.name for tc in r.choices[0].message.tool_calls] == ["create_ticket"]


def test_auto_tool_choice_needs_the_flag(server_factory, demo_tokenizer):
    s = serve(server_factory, demo_tokenizer, TWO_CALLS, enable_auto_tool_choice=False)
    import openai

    for choice in ({"tool_choice": "auto"}, {}):  # "auto" is also the default when tools are given
        with pytest.raises(openai.BadRequestError) as e:
            s.client().chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, **choice)
        assert "enable-auto-tool-choice" in e.value.message
    r = s.client().chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice="required",
                                           max_tokens=200)
    assert [tc.function.name for tc in r.choices[0].message.tool_calls] == ["lookup_user", "create_ticket"]


def test_thinking_budget_closes_the_think_block(server_factory, demo_tokenizer):
    # The script never closes its think block; the budget makes the server append "</think>\n" and continue.
    script = "one two three four five six seven eight nine ten eleven twelve.</think>\nDone."
    engine = ScriptedEngine(demo_tokenizer, script=lambda ids: script)
    s = server_factory(engine)
    c = s.client()
    budget = 4
    for stream in (False, True):
        engine.requests.clear()
        kwargs = dict(model=MODEL_NAME, messages=USER, max_tokens=60, extra_body={"max_thinking_tokens": budget})
        if stream:
            got = collect_stream(c.chat.completions.create(stream=True, **kwargs))
            reasoning, content = got["reasoning"], got["content"]
        else:
            r = c.chat.completions.create(**kwargs)
            reasoning, content = r.choices[0].message.reasoning_content, r.choices[0].message.content
            forced = len(demo_tokenizer.encode("</think>\n").ids)
            assert r.usage.completion_tokens_details.reasoning_tokens == budget + forced
        assert reasoning == demo_tokenizer.decode(demo_tokenizer.encode(script).ids[:budget])
        assert content  # the answer still comes
        # Two engine requests: the budget-capped one, then the continuation whose prompt ends with "</think>\n".
        assert len(engine.requests) == 2
        assert engine.requests[0][1].max_tokens == budget
        tail = demo_tokenizer.decode(engine.requests[1][0][-3:], skip_special_tokens=False)
        assert tail.endswith("</think>\n")


def test_budget_in_template_kwargs_and_n_choices(server_factory, demo_tokenizer):
    s = serve(server_factory, demo_tokenizer, "r\n</think>\nanswer")
    r = s.client().chat.completions.create(model=MODEL_NAME, messages=USER, n=3, max_tokens=20,
                                           extra_body={"chat_template_kwargs": {"max_thinking_tokens": 100}})
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert all(ch.message.content == "answer" for ch in r.choices)


def rendered(s, **body):
    body.setdefault("messages", USER)
    r = httpx.post(f"{s.base_url}/tokenize", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["prompt"]


def test_effort_and_kwargs_reach_the_template(server_factory, demo_tokenizer):
    s = serve(server_factory, demo_tokenizer, "x")
    assert rendered(s).endswith("<|im_start|>assistant\n<think>\n")
    assert rendered(s, chat_template_kwargs={"enable_thinking": False}).endswith("<|im_start|>assistant\n<think></think>")
    assert rendered(s, reasoning_effort="minimal").endswith("<think></think>")
    low = rendered(s, reasoning_effort="low")
    assert low.endswith("<think>\n") and low != rendered(s)
    # explicit kwargs win over reasoning_effort
    assert rendered(s, reasoning_effort="none", chat_template_kwargs={"enable_thinking": True}).endswith("<think>\n")
    # chat usage counts exactly the rendered prompt
    n = httpx.post(f"{s.base_url}/tokenize", json={"messages": USER},
                   headers={"Authorization": f"Bearer {API_KEY}"}).json()["count"]
    r = s.client().chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=5)
    assert r.usage.prompt_tokens == n


def test_request_chat_template_refused_unless_trusted(server_factory, demo_tokenizer):
    import openai

    s = serve(server_factory, demo_tokenizer, "x")
    with pytest.raises(openai.BadRequestError) as e:
        s.client().chat.completions.create(model=MODEL_NAME, messages=USER, extra_body={"chat_template": "{{ 1 }}"})
    assert e.value.body["param"] == "chat_template"
    trusted = serve(server_factory, demo_tokenizer, "x", trust_request_chat_template=True)
    assert rendered(trusted, chat_template="PROMPT {{ messages[0].content }}") == "PROMPT help"
    with pytest.raises(openai.BadRequestError):  # a sandbox escape attempt is a template error
        trusted.client().chat.completions.create(
            model=MODEL_NAME, messages=USER,
            extra_body={"chat_template": "{{ cycler.__init__.__globals__.os.popen('id').read() }}"})


def test_multi_turn_with_tool_results(server_factory, demo_tokenizer):
    s = serve(server_factory, demo_tokenizer, "done\n</think>\nReset done.")
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup_user", "arguments": '{"email": "a@b.c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"user_id": "U1"}'},
    ]
    prompt = rendered(s, messages=messages, tools=TOOLS)
    assert "<tool_response>\n{\"user_id\": \"U1\"}\n</tool_response>" in prompt
    assert "<parameter=email>\na@b.c\n</parameter>" in prompt
    r = s.client().chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS)
    assert r.choices[0].message.content == "Reset done."


LONG_JSON = '{"answer": "' + "the printer on floor three is jammed again and again " * 6 + '"}'
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "r", "schema": {
    "type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}}}


def _reply(c, stream, **kwargs):
    """(content, reasoning, tool calls as (name, arguments), finish_reason) of one request, streamed or not."""
    kwargs.setdefault("model", MODEL_NAME)
    kwargs.setdefault("messages", USER)
    if stream:
        got = collect_stream(c.chat.completions.create(stream=True, **kwargs))
        return got["content"], got["reasoning"], [(x["name"], x["arguments"]) for x in got["calls"]], got["finish"]
    choice = c.chat.completions.create(**kwargs).choices[0]
    calls = [(tc.function.name, tc.function.arguments) for tc in choice.message.tool_calls or []]
    return choice.message.content, choice.message.reasoning_content, calls, choice.finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_a_constrained_reply_cut_by_max_tokens_is_a_well_formed_length_reply(server_factory, demo_tokenizer, stream):
    """max_tokens inside an unbounded JSON string: a 200 with finish_reason "length" and the text so far as content
    (not valid JSON, as OpenAI returns it), streamed and not."""
    s = serve(server_factory, demo_tokenizer, LONG_JSON)
    content, reasoning, calls, finish = _reply(s.client(), stream, max_tokens=12, response_format=SCHEMA_FORMAT,
                                               reasoning_effort="none")
    assert finish == "length" and not calls and reasoning is None
    assert content and LONG_JSON.startswith(content) and len(content) < len(LONG_JSON)
    # with thinking on, cut in the think block: reasoning only, no content
    s = serve(server_factory, demo_tokenizer, "thinking about it " * 20 + "</think>\n" + LONG_JSON)
    content, reasoning, calls, finish = _reply(s.client(), stream, max_tokens=8, response_format=SCHEMA_FORMAT)
    assert finish == "length" and reasoning and content is None and not calls


@pytest.mark.parametrize("stream", [False, True])
def test_calls_cut_by_max_tokens_keep_the_complete_ones(server_factory, demo_tokenizer, stream):
    """tool_choice "required" cut inside the second call: the first, complete, call is returned (finish_reason
    "tool_calls", as whenever calls are returned) and nothing of the cut one is; cut inside the first call: no
    call, finish_reason "length"."""
    s = serve(server_factory, demo_tokenizer, TWO_CALLS)
    ids = demo_tokenizer.encode(TWO_CALLS, add_special_tokens=False).ids
    text = lambda n: demo_tokenizer.decode(ids[:n], skip_special_tokens=True)  # noqa: E731
    in_second = next(n for n in range(len(ids)) if "<parameter=title>\nVPN" in text(n))
    content, _, calls, finish = _reply(s.client(), stream, tools=TOOLS, tool_choice="required", max_tokens=in_second)
    assert finish == "tool_calls"
    assert calls == [("lookup_user", json.dumps({"email": "ana@example.com"}))], calls
    in_first = next(n for n in range(len(ids)) if "<parameter=email>\nana" in text(n))
    content, _, calls, finish = _reply(s.client(), stream, tools=TOOLS, tool_choice="required", max_tokens=in_first)
    assert finish == "length" and not calls

"""qwen3_coder parsing of the inputs peers' test suites (vLLM, SGLang, llama.cpp) probe: markup inside values, typed
unions, undeclared parameters, a missing <tool_call>, calls after reasoning without </think>; each case also
streamed, split at every character."""
import json

import pytest

from nemoh.chat import ChatOutputParser
from nemoh.chat.tools import Qwen3CoderToolParser

TOOLS = [
    {"type": "function", "function": {"name": "write_file", "parameters": {"type": "object", "properties": {
        "path": {"type": "string"}, "content": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "typed", "parameters": {"type": "object", "properties": {
        "opt_str": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "opt_int": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "one": {"oneOf": [{"type": "integer"}, {"type": "string", "enum": ["auto", "off"]}]},
        "listed": {"type": ["integer", "string"]},
        "nullable": {"type": "string", "nullable": True},
        "maybe_obj": {"type": ["object", "null"]}}}}},
]


def call(name, **params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


EXAMPLE = call("get_weather", city="Paris")
CASES = [
    # (text, expected content, expected [(name, arguments)])
    (call("write_file", path="a.md", content="Use the <tool_call> tag to call a tool."), None,
     [("write_file", {"path": "a.md", "content": "Use the <tool_call> tag to call a tool."})]),
    (call("write_file", path="x.xml", content="<a>1</parameter>2</a>\n</parameter>\nstill content"), None,
     [("write_file", {"path": "x.xml", "content": "<a>1</parameter>2</a>\n</parameter>\nstill content"})]),
    (call("write_file", path="doc.md", content="Example:\n" + EXAMPLE + "\nEnd."), None,
     [("write_file", {"path": "doc.md", "content": "Example:\n" + EXAMPLE + "\nEnd."})]),
    (call("write_file", path="doc.md", content=EXAMPLE) + "\n" + call("get_weather", city="Oslo", days="2"), None,
     [("write_file", {"path": "doc.md", "content": EXAMPLE}), ("get_weather", {"city": "Oslo", "days": 2})]),
    (call("typed", opt_str="42", opt_int="42", one="7", listed="42", nullable="None", maybe_obj="null"), None,
     [("typed", {"opt_str": "42", "opt_int": 42, "one": 7, "listed": "42", "nullable": None, "maybe_obj": None})]),
    (call("typed", opt_str="None", opt_int="null", one="auto", maybe_obj='{"a": 1}'), None,
     [("typed", {"opt_str": None, "opt_int": None, "one": "auto", "maybe_obj": {"a": 1}})]),
    (call("get_weather", city="Rome", extra="1.10", count="12", note="007"), None,
     [("get_weather", {"city": "Rome", "extra": "1.10", "count": 12, "note": "007"})]),
    ("Sure.\n<function=get_weather>\n<parameter=city>\nLima\n</parameter>\n</function>\n</tool_call>", "Sure.",
     [("get_weather", {"city": "Lima"})]),
    ("<function=get_weather>\n<parameter=city>\nLima\n</parameter>\n</function>", None,
     [("get_weather", {"city": "Lima"})]),
    ("Use <function=name> to call.", "Use <function=name> to call.", []),
    (EXAMPLE + "\n" + call("get_weather", city="Oslo") + "\n" + call("write_file", path="p", content="c"), None,
     [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"}), ("write_file", {"path": "p", "content": "c"})]),
]


def _calls(result):
    return [(c.name, json.loads(c.arguments)) for c in result.tool_calls]


def _stream(pieces):
    parser = Qwen3CoderToolParser(TOOLS)
    content, calls = [], {}
    for items in [parser.feed(p) for p in pieces] + [parser.finish()]:
        for item in items:
            if item.content is not None:
                content.append(item.content)
            else:
                tc = item.tool_call
                calls.setdefault(tc.index, [tc.name, ""])
                calls[tc.index][1] += tc.arguments_fragment or ""
    return "".join(content) or None, [(calls[i][0], json.loads(calls[i][1])) for i in sorted(calls)]


@pytest.mark.parametrize("text, content, calls", CASES)
def test_extract(text, content, calls):
    result = Qwen3CoderToolParser(TOOLS).extract(text)
    assert (result.content, _calls(result)) == (content, calls)


@pytest.mark.parametrize("text, content, calls", CASES)
def test_streaming_at_every_split(text, content, calls):
    for i in range(len(text) + 1):
        assert _stream([text[:i], text[i:]]) == (content, calls), i
    assert _stream(list(text)) == (content, calls)


REASONING_CASES = [
    # reasoning that never closes its think block, then calls (REFERENCE §5): the calls still count
    ("Let me check the weather.\n" + EXAMPLE + "\n" + call("get_weather", city="Oslo"),
     "Let me check the weather.", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]),
    ("thinking</think>\n" + call("write_file", path="a", content=EXAMPLE), "thinking",
     [("write_file", {"path": "a", "content": EXAMPLE})]),
]


@pytest.mark.parametrize("text, reasoning, calls", REASONING_CASES)
def test_calls_after_reasoning_streaming_and_not(text, reasoning, calls):
    def parser():
        return ChatOutputParser("super_v3", "qwen3_coder", tools=TOOLS, thinking_enabled=True)

    parsed = parser().parse(text)
    assert (parsed.reasoning.strip(), parsed.content, [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]) \
        == (reasoning, None, calls)
    for i in range(len(text) + 1):
        p = parser()
        deltas = [p.feed(text[:i]), p.feed(text[i:]), p.finish()]
        args: dict[int, list] = {}
        for d in deltas:
            for tc in d.tool_calls:
                args.setdefault(tc.index, [tc.name, ""])
                args[tc.index][1] += tc.arguments_fragment or ""
        assert [(args[k][0], json.loads(args[k][1])) for k in sorted(args)] == calls, i


def test_parallel_tool_calls_false_returns_the_first_call_only():
    text = EXAMPLE + "\n" + call("get_weather", city="Oslo")
    parsed = ChatOutputParser(None, "qwen3_coder", tools=TOOLS, parallel_tool_calls=False).parse(text)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", {"city": "Paris"})]

"""qwen3_coder tool parser: scripted outputs, typed values, malformed input, streaming at every split."""

import itertools
import json

import pytest

from nemoh.chat.tools import (
    TOOL_PARSERS,
    Qwen3CoderToolParser,
    ToolCall,
    ToolParseResult,
    convert_value,
    get_tool_parser,
    make_tool_call_id,
)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "configure", "parameters": {"type": "object", "properties": {
        "options": {"type": "object"}, "items": {"type": "array"}, "enabled": {"type": "boolean"},
        "nothing": {"type": "null"}, "ratio": {"type": "number"}, "count": {"type": "integer"},
        "label": {"type": ["string", "null"]}, "mystery": {"type": "whatever"}, "untyped": {}}}}},
]


def call(name, **params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>\n"


WEATHER = call("get_weather", city="Paris", days="3")
CONFIG = call("configure", options='{"a": {"b": [1, 2.5, null]}, "ü": "😀"}', items="[1, \"two\", [3]]",
              enabled="true", nothing="null", ratio="-1.5e3", count="42", label="null", mystery='{"x": 1}',
              untyped="plain words")

CASES = [
    # (text, expected content, expected [(name, arguments dict)])
    ("Just text, no calls.", "Just text, no calls.", []),
    (WEATHER, None, [("get_weather", {"city": "Paris", "days": 3})]),
    ("Let me check.\n\n" + WEATHER, "Let me check.", [("get_weather", {"city": "Paris", "days": 3})]),
    (WEATHER + WEATHER.replace("Paris", "Oslo"), None,
     [("get_weather", {"city": "Paris", "days": 3}), ("get_weather", {"city": "Oslo", "days": 3})]),
    (WEATHER + "\nDone, see above. 😀\n", "\n\nDone, see above. 😀\n", [("get_weather", {"city": "Paris", "days": 3})]),
    (CONFIG, None, [("configure", {
        "options": {"a": {"b": [1, 2.5, None]}, "ü": "😀"}, "items": [1, "two", [3]], "enabled": True,
        "nothing": None, "ratio": -1500.0, "count": 42, "label": None, "mystery": {"x": 1}, "untyped": "plain words"})]),
    (call("configure", options="{'k': True, 'n': None}", items="(1, 2)", enabled="False", nothing="None",
          count="7.0", ratio="3"), None,
     [("configure", {"options": {"k": True, "n": None}, "items": "(1, 2)", "enabled": False, "nothing": None,
                     "count": 7, "ratio": 3})]),
    (call("configure", options="{broken", enabled="maybe", count="many", ratio="NaN"), None,
     [("configure", {"options": "{broken", "enabled": "maybe", "count": "many", "ratio": "NaN"})]),
    (call("get_weather", city="\n  two\nlines \n"), None, [("get_weather", {"city": "\n  two\nlines \n"})]),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nRome</function>\n</tool_call>", None,
     [("get_weather", {"city": "Rome"})]),  # missing </parameter> is tolerated
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>", None,
     [("get_weather", {"city": "Rome"})]),  # stopped before </tool_call>
    ("<tool_call>\n<function=get_weather>\n</function>\n</tool_call>", None, [("get_weather", {})]),
    # malformed: all stay content
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</tool_call>",
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</tool_call>", []),
    ("<tool_call>\n<function get_weather>\n</function>\n</tool_call>",
     "<tool_call>\n<function get_weather>\n</function>\n</tool_call>", []),
    ("<tool_call>\n<function=get_weather>\n<parameter>city</parameter>\n</function>\n</tool_call>",
     "<tool_call>\n<function=get_weather>\n<parameter>city</parameter>\n</function>\n</tool_call>", []),
    ("<tool_call>garbage</tool_call>", "<tool_call>garbage</tool_call>", []),
    ("<tool_call>\n<function=get_weather>\nstray text\n</function>\n</tool_call>",
     "<tool_call>\n<function=get_weather>\nstray text\n</function>\n</tool_call>", []),
    ("<tool_call>\n<function=get_weather>\n</function>\ntrailing junk\n</tool_call>",
     "<tool_call>\n<function=get_weather>\n</function>\ntrailing junk\n</tool_call>", []),
    (call("launch_missiles", target="moon"), call("launch_missiles", target="moon"), []),
    ("<tool_call>\n<function=get_weather>\n", "<tool_call>\n<function=get_weather>\n", []),
    ("a <tool_call", "a <tool_call", []),
    ("<tool_call>half<tool_call>\n<function=get_weather>\n</function>\n</tool_call>", "<tool_call>half",
     [("get_weather", {})]),
    ("x " + call("nope") + "y " + WEATHER + " z", "x " + call("nope") + "y\n z",
     [("get_weather", {"city": "Paris", "days": 3})]),
    ("<tool_call></tool_call>", "<tool_call></tool_call>", []),
    ("", None, []),
]


def _ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def _expected(content, calls):
    return ToolParseResult(content, [ToolCall(f"call_{i}", n, json.dumps(a, ensure_ascii=False))
                                     for i, (n, a) in enumerate(calls)])


@pytest.mark.parametrize("text,content,calls", CASES)
def test_extract(text, content, calls):
    assert Qwen3CoderToolParser(TOOLS, id_generator=_ids()).extract(text) == _expected(content, calls)


def _stream(pieces):
    parser = Qwen3CoderToolParser(TOOLS, id_generator=_ids())
    content, calls = [], {}
    for items in [parser.feed(p) for p in pieces] + [parser.finish()]:
        for item in items:
            assert (item.content is None) != (item.tool_call is None)
            if item.content is not None:
                assert item.content
                content.append(item.content)
                continue
            tc = item.tool_call
            if tc.index not in calls:
                assert tc.index == len(calls) and tc.id and tc.name  # first delta: id + name, in order
                calls[tc.index] = ToolCall(tc.id, tc.name, "")
            else:
                assert tc.id is None and tc.name is None
            calls[tc.index].arguments += tc.arguments_fragment or ""
    return ToolParseResult("".join(content) or None, [calls[i] for i in sorted(calls)])


@pytest.mark.parametrize("text,content,calls", CASES)
def test_streaming_matches_extract_at_every_split(text, content, calls):
    expected = _expected(content, calls)
    for i in range(len(text) + 1):
        assert _stream([text[:i], text[i:]]) == expected, i
    assert _stream(list(text)) == expected


def test_text_before_a_call_streams_immediately():
    parser = Qwen3CoderToolParser(TOOLS)
    assert [d.content for d in parser.feed("Checking the weather")] == ["Checking the weather"]
    # The newline and the partial tag are held: they may turn out to precede a call.
    assert [d.content for d in parser.feed(" now.\n<tool_")] == [" now."]
    items = parser.feed("call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>")
    assert not [i for i in items if i.content]
    first, args = [i.tool_call for i in items if i.tool_call]
    assert first.name == "get_weather" and first.id.startswith("call_") and first.arguments_fragment is None
    assert json.loads(args.arguments_fragment) == {"city": "Paris"}


def test_no_tools_accepts_any_function_untyped():
    result = Qwen3CoderToolParser(None).extract(call("anything", n="5", s="text"))
    assert [(c.name, json.loads(c.arguments)) for c in result.tool_calls] == [("anything", {"n": 5, "s": "text"})]


def test_malformed_tool_schemas_do_not_crash():
    tools = [None, "x", {"type": "function"}, {"function": {"name": 3}},
             {"function": {"name": "ok", "parameters": {"properties": ["not", "a", "dict"]}}},
             {"function": {"name": "ok2", "parameters": {"properties": {"a": "not a schema"}}}}]
    parser = Qwen3CoderToolParser(tools)
    result = parser.extract(call("ok", a="1") + call("ok2", a="[1]") + call("missing"))
    assert [(c.name, json.loads(c.arguments)) for c in result.tool_calls] == [("ok", {"a": 1}), ("ok2", {"a": [1]})]
    assert result.content == "\n" + call("missing")  # raw text, with the whitespace that leads to it


@pytest.mark.parametrize("text,schema,expected", [
    ("007", {"type": "integer"}, 7),
    ("1e400", {"type": "number"}, "1e400"),
    ("Infinity", {"type": "number"}, "Infinity"),
    ("TRUE", {"type": "boolean"}, True),
    ("[" * 5000 + "]" * 5000, {"type": "array"}, "[" * 5000 + "]" * 5000),  # too deep: kept as text
    ("{1, 2}", {"type": "object"}, "{1, 2}"),  # a Python set is not JSON
    ("\"quoted\"", {"type": "string"}, "\"quoted\""),
    ("a", {"enum": ["a", "b"]}, "a"),
    ("12", None, 12),
    ("12 apples", None, "12 apples"),
    ("1e400", None, "1e400"),  # would not survive json.dumps as a number
])
def test_convert_value(text, schema, expected):
    assert convert_value(text, schema) == expected


def test_ids_and_registry():
    ident = make_tool_call_id()
    assert ident.startswith("call_") and len(ident) == 29 and ident[5:].isalnum()
    assert make_tool_call_id() != ident
    assert TOOL_PARSERS["qwen3_coder"] is Qwen3CoderToolParser is get_tool_parser("qwen3_coder")
    with pytest.raises(ValueError, match="unknown tool parser"):
        get_tool_parser("hermes2")


def test_long_streamed_call_is_linear():
    import time

    text = call("get_weather", city="x = 1\n" * 30_000)
    parser = Qwen3CoderToolParser(TOOLS)
    start = time.monotonic()
    items = [item for i in range(0, len(text), 3) for item in parser.feed(text[i:i + 3])] + parser.finish()
    assert time.monotonic() - start < 1.0
    assert json.loads(items[1].tool_call.arguments_fragment)["city"] == "x = 1\n" * 30_000

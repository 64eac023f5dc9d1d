"""ChatOutputParser: reasoning + tool calls together; streaming equals non-streaming at every split."""

import itertools
import json

import pytest

from nemoh.chat.output_parser import ChatOutputParser, ParsedChat
from nemoh.chat.tools import ToolCall

TOOLS = [
    {"type": "function", "function": {"name": "lookup_user", "parameters": {"type": "object", "properties": {
        "email": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "create_ticket", "parameters": {"type": "object", "properties": {
        "title": {"type": "string"}, "priority": {"type": "integer"}, "tags": {"type": "array"},
        "urgent": {"type": "boolean"}, "meta": {"type": "object"}, "due": {"type": ["string", "null"]}}}}},
]


def call(name, **params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>\n"


LOOKUP = call("lookup_user", email="bob@example.com")
TICKET = call("create_ticket", title="VPN down 😀", priority="2", tags='["vpn", "p2"]', urgent="True",
              meta='{"site": {"floor": 3}, "ok": null}', due="null")

SCRIPTS = {
    "plain": "The user greets me.\n</think>\nHello! 😀",
    "budget_out": "Thinking and thinking about 答え",
    "empty_content": "Short thought.\n</think>\n",
    "tool_after_think": "Need the account.\n</think>\n\n" + LOOKUP,
    "two_tools_and_text": "Plan: look up, then ticket.\n</think>\nOn it.\n" + LOOKUP + TICKET + "\nBoth done.",
    "tool_in_reasoning": "I should look the user up.\n" + LOOKUP,
    "tool_in_reasoning_then_end": "Look up first.\n" + LOOKUP + "then answer\n</think>\nDone.",
    "unknown_in_reasoning": "Maybe " + call("nope") + "no.",
    "malformed_after_think": "x\n</think>\n<tool_call>\n<function=lookup_user>\n<parameter=email>\na\n</parameter>\n</tool_call>",
    "unknown_function": "ok\n</think>\n" + call("delete_everything", really="yes"),
    "leading_think": "<think>\nhmm\n</think>\nyes",
    "tag_lookalikes": "a </thi b <tool_ c </tool_call> d\n</think>\n<tool e </think> f <tool_call",
    "no_think_tool": LOOKUP,
}

CONFIGS = {
    "default": {},
    "force": {"force_nonempty_content": True},
    "thinking_off": {"thinking_enabled": False},
    "tool_choice_none": {"tool_choice": "none"},
    "named_choice": {"tool_choice": {"type": "function", "function": {"name": "create_ticket"}}},
    "no_reasoning_parser": {"reasoning_parser_name": None},
    "no_tools": {"tools": None},
}


def make_parser(**overrides):
    counter = itertools.count()
    settings = {"reasoning_parser_name": "super_v3", "tool_parser_name": "qwen3_coder", "tools": TOOLS,
                "thinking_enabled": True, "force_nonempty_content": False, "tool_choice": "auto",
                "id_generator": lambda: f"call_{next(counter)}"}
    settings.update(overrides)
    return ChatOutputParser(**settings)


def stream(pieces, **config):
    parser = make_parser(**config)
    reasoning, content, calls = [], [], {}
    for delta in [parser.feed(p) for p in pieces] + [parser.finish()]:
        if delta.reasoning is not None:
            assert delta.reasoning
            reasoning.append(delta.reasoning)
        if delta.content is not None:
            assert delta.content
            content.append(delta.content)
        for tc in delta.tool_calls:
            if tc.index not in calls:
                assert tc.index == len(calls) and tc.id and tc.name
                calls[tc.index] = ToolCall(tc.id, tc.name, "")
            calls[tc.index].arguments += tc.arguments_fragment or ""
    return ParsedChat("".join(reasoning) or None, "".join(content) or None, [calls[i] for i in sorted(calls)])


def args(parsed):
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_streaming_equals_non_streaming_at_every_split(script, config):
    text, settings = SCRIPTS[script], CONFIGS[config]
    expected = make_parser(**settings).parse(text)
    for i in range(len(text) + 1):
        assert stream([text[:i], text[i:]], **settings) == expected, i
    assert stream(list(text), **settings) == expected


def test_plain_answer():
    parsed = make_parser().parse(SCRIPTS["plain"])
    assert parsed == ParsedChat("The user greets me.", "Hello! 😀", [])
    assert not parsed.has_tool_calls


def test_budget_ran_out():
    assert make_parser().parse(SCRIPTS["budget_out"]) == ParsedChat("Thinking and thinking about 答え", None, [])
    forced = make_parser(force_nonempty_content=True).parse(SCRIPTS["budget_out"])
    assert forced == ParsedChat("Thinking and thinking about 答え", "Thinking and thinking about 答え", [])
    assert make_parser(force_nonempty_content=True).parse(SCRIPTS["empty_content"]).content == "Short thought."


def test_force_nonempty_does_not_apply_to_tool_call_replies():
    parsed = make_parser(force_nonempty_content=True).parse(SCRIPTS["tool_after_think"])
    assert parsed.content is None and parsed.has_tool_calls


def test_thinking_off_everything_is_content():
    parsed = make_parser(thinking_enabled=False).parse(SCRIPTS["plain"])
    assert parsed == ParsedChat(None, SCRIPTS["plain"], [])


def test_tool_call_after_think():
    parsed = make_parser().parse(SCRIPTS["tool_after_think"])
    assert parsed.reasoning == "Need the account."
    assert parsed.content is None
    assert parsed.tool_calls == [ToolCall("call_0", "lookup_user", '{"email": "bob@example.com"}')]
    assert parsed.has_tool_calls


def test_two_tools_typed_arguments_and_text_after():
    parsed = make_parser().parse(SCRIPTS["two_tools_and_text"])
    assert parsed.content == "On it.\n\nBoth done."  # text after the calls keeps the whitespace before it
    assert args(parsed) == [
        ("lookup_user", {"email": "bob@example.com"}),
        ("create_ticket", {"title": "VPN down 😀", "priority": 2, "tags": ["vpn", "p2"], "urgent": True,
                           "meta": {"site": {"floor": 3}, "ok": None}, "due": None}),
    ]
    assert [c.id for c in parsed.tool_calls] == ["call_0", "call_1"]


def test_tool_call_inside_reasoning_without_end_tag():
    parsed = make_parser().parse(SCRIPTS["tool_in_reasoning"])
    assert parsed == ParsedChat("I should look the user up.", None,
                                [ToolCall("call_0", "lookup_user", '{"email": "bob@example.com"}')])
    # streaming: the call comes out as a tool call delta, never as reasoning text
    parser = make_parser()
    deltas = [parser.feed(ch) for ch in SCRIPTS["tool_in_reasoning"]] + [parser.finish()]
    assert "<tool_call>" not in "".join(d.reasoning or "" for d in deltas)
    assert sum(len(d.tool_calls) for d in deltas) == 2


def test_tool_call_inside_reasoning_then_content():
    parsed = make_parser().parse(SCRIPTS["tool_in_reasoning_then_end"])
    assert parsed.reasoning == "Look up first.\nthen answer"
    assert parsed.content == "Done."
    assert args(parsed) == [("lookup_user", {"email": "bob@example.com"})]


def test_unknown_or_malformed_calls_stay_text():
    assert make_parser().parse(SCRIPTS["unknown_in_reasoning"]) == ParsedChat(
        "Maybe " + call("nope") + "no.", None, [])
    parsed = make_parser().parse(SCRIPTS["unknown_function"])
    assert parsed.content == call("delete_everything", really="yes") and not parsed.tool_calls
    parsed = make_parser().parse(SCRIPTS["malformed_after_think"])
    assert parsed.content.startswith("<tool_call>\n<function=lookup_user>") and not parsed.tool_calls


def test_tool_choice_none_and_named():
    text = SCRIPTS["two_tools_and_text"]
    none = make_parser(tool_choice="none").parse(text)
    assert not none.tool_calls and none.content == text.split("</think>\n", 1)[1]
    named = make_parser(tool_choice={"type": "function", "function": {"name": "create_ticket"}}).parse(text)
    assert [c.name for c in named.tool_calls] == ["create_ticket"]
    assert LOOKUP.rstrip() in named.content


def test_no_tools_means_no_tool_parsing():
    parsed = make_parser(tools=None).parse(SCRIPTS["no_think_tool"])
    assert parsed.reasoning == LOOKUP and not parsed.tool_calls


def test_parse_does_not_disturb_a_stream():
    parser = make_parser()
    first = parser.feed("half a thought")
    assert parser.parse(SCRIPTS["plain"]).content == "Hello! 😀"
    rest = parser.feed("\n</think>\nanswer")
    end = parser.finish()
    assert (first.reasoning, rest.content, end.is_empty()) == ("half a thought", "answer", True)


def test_feed_after_finish_is_an_error():
    parser = make_parser()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")

"""The shipped nemotron3.jinja: exact text for the REFERENCE §5 chat contract."""

import pytest

from nemoh.chat.reasoning import SuperV3ReasoningParser
from nemoh.chat.template import ChatTemplate, TemplateError, builtin_template_source
from nemoh.chat.tools import Qwen3CoderToolParser

TOOLS = [
    {"type": "function", "function": {
        "name": "create_ticket", "description": "  Open a ticket.  ",
        "parameters": {"type": "object", "properties": {
            "title": {"type": "string", "description": "Short title."},
            "category": {"type": "string", "enum": ["network", "other"]},
            "priority": {"type": "integer", "minimum": 1}},
            "required": ["title", "priority"]}}},
]


@pytest.fixture(scope="module")
def template():
    return ChatTemplate(builtin_template_source("nemotron3"))


def test_generation_prompt_thinking_on_and_off(template):
    msgs = [{"role": "user", "content": "hi"}]
    assert template.render(msgs) == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert template.render(msgs, enable_thinking=False).endswith("hi<|im_end|>\n<|im_start|>assistant\n<think></think>")
    assert template.render(msgs, add_generation_prompt=False).endswith("hi<|im_end|>\n")


def test_system_turn_lists_tools(template):
    out = template.render([{"role": "system", "content": "You help."}, {"role": "user", "content": "x"}], tools=TOOLS)
    expected_tools = (
        "<|im_start|>system\nYou help.\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
        "<function>\n<name>create_ticket</name>\n<description>Open a ticket.</description>\n<parameters>\n"
        "<parameter>\n<name>title</name>\n<type>string</type>\n<description>Short title.</description>\n</parameter>\n"
        "<parameter>\n<name>category</name>\n<type>string</type>\n<enum>[\"network\", \"other\"]</enum>\n</parameter>\n"
        "<parameter>\n<name>priority</name>\n<type>integer</type>\n<minimum>1</minimum>\n</parameter>\n"
        "<required>[\"title\", \"priority\"]</required>\n</parameters>\n</function>\n</tools>\n\n"
        "If you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n"
    )
    assert out.startswith(expected_tools)
    assert "</IMPORTANT><|im_end|>\n<|im_start|>user\nx<|im_end|>\n" in out


def test_low_effort_marks_last_user_message_only(template):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    out = template.render(msgs, low_effort=True)
    assert "<|im_start|>user\na<|im_end|>" in out
    assert "<|im_start|>user\nc\n\n{reasoning effort: low}<|im_end|>\n<|im_start|>assistant\n<think>\n" in out
    assert "{reasoning effort: low}" not in template.render(msgs)


def test_history_thinking_truncation(template):
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
    ]
    out = template.render(msgs, add_generation_prompt=False)
    # NVIDIA's template keeps the newline that followed </think>.
    assert "<|im_start|>assistant\n<think></think>\na1<|im_end|>\n" in out
    assert "r1" not in out
    # The turn after the last user message keeps its reasoning.
    assert out.endswith("<|im_start|>assistant\n<think>\nr2\n</think>\na2<|im_end|>\n")
    kept = template.render(msgs, add_generation_prompt=False, truncate_history_thinking=False)
    assert "<|im_start|>assistant\n<think>\nr1\n</think>\na1<|im_end|>\n" in kept


def test_tool_calls_and_grouped_tool_responses(template):
    msgs = [
        {"role": "user", "content": "open one"},
        {"role": "assistant", "content": None, "reasoning_content": "need a ticket", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "create_ticket",
             "arguments": "{\"title\": \"VPN\\ndown\", \"priority\": 2, \"tags\": [\"a\", {\"b\": null}], \"urgent\": true}"}},
            {"id": "2", "type": "function", "function": {"name": "create_ticket", "arguments": {"title": "x"}}}]},
        {"role": "tool", "tool_call_id": "1", "content": "INC-1"},
        {"role": "tool", "tool_call_id": "2", "content": "INC-2"},
    ]
    out = template.render(msgs, tools=TOOLS)
    # Objects and lists as JSON, scalars as Python writes them (True), as NVIDIA's template renders them.
    assert out.endswith(
        "<|im_start|>assistant\n<think>\nneed a ticket\n</think>\n"
        "<tool_call>\n<function=create_ticket>\n<parameter=title>\nVPN\ndown\n</parameter>\n"
        "<parameter=priority>\n2\n</parameter>\n<parameter=tags>\n[\"a\", {\"b\": null}]\n</parameter>\n"
        "<parameter=urgent>\nTrue\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=create_ticket>\n<parameter=title>\nx\n</parameter>\n</function>\n</tool_call>\n"
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nINC-1\n</tool_response>\n<tool_response>\nINC-2\n</tool_response>\n<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_non_object_arguments_raise(template):
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}]
    with pytest.raises(TemplateError, match="JSON object"):
        template.render(msgs)


def test_content_parts_are_joined(template):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]}]
    assert "<|im_start|>user\nab<|im_end|>" in template.render(msgs)


def test_round_trip_through_the_parsers(template):
    """A generation parsed by super_v3 + qwen3_coder renders back to the same text as history."""
    generated = ("check the id\n</think>\n<tool_call>\n<function=create_ticket>\n<parameter=title>\nVPN\n</parameter>\n"
                 "<parameter=priority>\n1\n</parameter>\n</function>\n</tool_call>\n")
    split = SuperV3ReasoningParser().parse(generated)
    calls = Qwen3CoderToolParser(TOOLS).extract(split.content).tool_calls
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "reasoning_content": split.reasoning,
             "tool_calls": [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                            for c in calls]}]
    prompt = template.render(msgs[:1], tools=TOOLS)
    full = template.render(msgs, tools=TOOLS, add_generation_prompt=False)
    assert full == prompt + generated + "<|im_end|>\n"

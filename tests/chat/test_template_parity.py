"""nemoh's nemotron3.jinja renders, shape by shape, what NVIDIA's published Nemotron 3 Super template renders.

The oracle is NVIDIA's template text (`../shared/reference/`, not part of the project), rendered the way
transformers' `apply_chat_template` renders a checkpoint's template: plain jinja2, the same environment and
helpers, messages with None-valued keys dropped and `reasoning` / `thinking` copied to `reasoning_content`.
Equal strings give equal token ids; a few shapes check the ids through the demo tokenizer as well.

Two inputs NVIDIA's template cannot take are normalised by nemoh first, and those shapes give the oracle the
normalised form: tool-call arguments sent as a JSON string (decoded to an object by `ChatTemplate`; NVIDIA's
template fails on a string) and content given as a list of parts (nemoh renders its text parts joined;
NVIDIA's template would print the list's Python repr).
"""

import itertools
import json
from pathlib import Path

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nemoh.chat.template import ChatTemplate, TemplateError, builtin_template_source

REPO = Path(__file__).resolve().parents[2]
REFERENCE_DIR = REPO.parent / "shared" / "reference"
SUPER_TEMPLATE = REFERENCE_DIR / "nemotron3_super_chat_template.jinja"
NANO_TEMPLATE = REFERENCE_DIR / "nemotron3_nano_chat_template.jinja"
DEMO_DIR = REPO / "nemoh" / "demo" / "model"

pytestmark = pytest.mark.skipif(
    not SUPER_TEMPLATE.is_file() or not NANO_TEMPLATE.is_file(),
    reason=f"NVIDIA's Nemotron 3 templates are not in {REFERENCE_DIR} (only the project's workspace has them)",
)

# Every combination of the template switches, and the defaults (no kwargs at all).
KWARG_SETS = [{}] + [
    {"add_generation_prompt": agp, "enable_thinking": think, "low_effort": low, "truncate_history_thinking": trunc}
    for agp, think, low, trunc in itertools.product([True, False], repeat=4)
]
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# ---- the oracle: NVIDIA's template as transformers renders it ---------------------------------------------------


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_oracle(path):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(path.read_text(encoding="utf-8"))


def _hf_messages(messages):
    """The messages as apply_chat_template hands them to the template."""
    out = []
    for message in json.loads(json.dumps(messages)):
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


@pytest.fixture(scope="module")
def oracles():
    return {"super": _compile_oracle(SUPER_TEMPLATE), "nano": _compile_oracle(NANO_TEMPLATE)}


@pytest.fixture(scope="module")
def ours():
    return ChatTemplate(builtin_template_source("nemotron3"))


def _render_oracle(template, messages, tools, kwargs):
    kwargs = {"add_generation_prompt": False, **kwargs}
    return template.render(messages=_hf_messages(messages), tools=tools, documents=None, **kwargs)


def _render_ours(template, messages, tools, kwargs):
    kwargs = {"add_generation_prompt": False, **kwargs}
    return template.render(messages, tools=tools, **kwargs)


# ---- conversation pieces -----------------------------------------------------------------------------------------


def system(content):
    return {"role": "system", "content": content}


def user(content):
    return {"role": "user", "content": content}


def assistant(content=None, reasoning=None, calls=None, **extra):
    message = {"role": "assistant", "content": content, **extra}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if calls is not None:
        message["tool_calls"] = calls
    return message


def call(name, arguments, call_id="call_1"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool(content, call_id="call_1"):
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def parts(*texts):
    """OpenAI content parts: the texts, with an image part in between that has no text to render."""
    out = [{"type": "text", "text": t} for t in texts]
    out.insert(1, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})
    return out


LOOKUP = {"type": "function", "function": {
    "name": "lookup_user", "description": "Find an account by e-mail.",
    "parameters": {"type": "object", "properties": {"email": {"type": "string", "description": "Work e-mail."}},
                   "required": ["email"]}}}

# Every JSON-schema piece NVIDIA's template handles: descriptions trimmed, type (a string or a list), enum,
# the other keys of a parameter (scalars as text, objects and lists as JSON), nested objects and arrays,
# `required`, keys beside `properties` (additionalProperties), keys beside `parameters` (strict, returns).
CREATE_TICKET = {"type": "function", "function": {
    "name": "create_ticket",
    "description": "\n  Open a ticket in the helpdesk queue.\n\nReturns its id.  \n",
    "parameters": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "description": "  Short title, one line.\n"},
            "category": {"type": "string", "enum": ["network", "hardware", "other"], "description": "Queue."},
            "priority": {"type": "integer", "minimum": 1, "maximum": 4, "default": 3},
            "ratio": {"type": "number", "exclusiveMinimum": 0.5},
            "urgent": {"type": "boolean", "default": False},
            "assignee": {"type": ["string", "null"], "nullable": True},
            "labels": {"type": "array", "items": {"type": "string", "enum": ["vpn", "wifi"]}, "minItems": 0},
            "contact": {"type": "object", "description": "Who to call back.",
                        "properties": {"name": {"type": "string"}, "phone": {"type": "string"}},
                        "required": ["name"]},
            "untyped": {},
            "note": {"description": "No type, no enum."},
        },
        "required": ["title", "category"],
        "additionalProperties": False,
    },
    "strict": True,
    "returns": {"type": "string"},
}}
PING = {"type": "function", "function": {"name": "ping"}}
EMPTY_PARAMS = {"type": "function", "function": {
    "name": "list_queues", "description": "All queues.", "parameters": {"type": "object", "properties": {}}}}
# A tool given without the {"type": "function", "function": ...} wrapper.
FLAT = {"name": "reset_password", "description": "Reset a password.",
        "parameters": {"type": "object", "properties": {"user_id": {"type": "string"}}, "required": ["user_id"]}}
UNICODE_TOOL = {"type": "function", "function": {
    "name": "übersetzen", "description": "Übersetzt Text — 日本語 too 😀 <b>&amp;</b>",
    "parameters": {"type": "object", "properties": {"text": {"type": "string", "description": "« Texte »"}}}}}
NONE_DESCRIPTION = {"type": "function", "function": {
    "name": "noop", "description": None, "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}

SCALARS = {"flag": True, "off": False, "nothing": None, "count": 3, "negative": -7, "ratio": 0.25, "big": 1e20,
           "text": "two\nlines", "empty": "", "padded": "  spaced  ", "quoted": "say \"hi\" & <bye>",
           "nested": {"a": [1, None, True], "b": {"c": "d"}}, "items": ["x", 2, False], "none_list": [],
           "no_keys": {}, "unicode": "ünï 😀"}
ARGS_JSON = json.dumps(SCALARS)

EXCHANGE = [user("reset bob"), assistant("", "look him up first", [call("lookup_user", {"email": "bob@x.io"})]),
            tool('{"user_id": "U1"}')]

# name -> (messages, tools, what the oracle is given instead, or None for the same messages)
SHAPES = {
    "single_user": ([user("hi")], None, None),
    "system_user": ([system("You are helpful."), user("hi")], None, None),
    "empty_system": ([system(""), user("hi")], None, None),
    "system_only": ([system("Be brief.")], None, None),
    "user_content_none": ([user(None)], None, None),
    "multiline_user": ([user("\n  line one\nline two  \n\n")], None, None),
    "unicode_and_markup": ([system("Réponds en français 🇫🇷"), user("日本語 <b>&</b> {{ not jinja }} {% raw %}")],
                           [UNICODE_TOOL], None),
    "tools_no_system": ([user("hi")], [LOOKUP], None),
    "tools_with_system": ([system("You help."), user("hi")], [LOOKUP, CREATE_TICKET], None),
    "tools_empty_system": ([system(""), user("hi")], [LOOKUP], None),
    "tools_every_schema_feature": ([user("open one")], [CREATE_TICKET], None),
    "tools_without_parameters": ([user("ping")], [PING, EMPTY_PARAMS], None),
    "tools_flat_and_wrapped": ([user("reset")], [FLAT, LOOKUP], None),
    "tool_description_none": ([user("x")], [NONE_DESCRIPTION], None),
    "tools_empty_list": ([user("hi")], [], None),
    "multi_turn_plain": ([user("a"), assistant("b"), user("c")], None, None),
    "history_reasoning_field": ([system("s"), user("a"), assistant("b", "think about b"), user("c"),
                                 assistant("d", "think about d"), user("e")], None, None),
    "history_raw_think": ([user("a"), assistant("<think>\nweigh it\n</think>\nb"), user("c")], None, None),
    "final_turn_reasoning": ([user("a"), assistant("b", "because")], None, None),
    "final_turn_raw_think": ([user("a"), assistant("<think>\nbecause\n</think>\nb")], None, None),
    "final_turn_without_reasoning": ([user("a"), assistant("just b")], None, None),
    "whitespace_after_think": ([user("a"), assistant("\n\n  b \n", "r"), user("c"),
                                assistant("<think>r2</think>\n\n  d"), user("e"), assistant(" f", "r3")], None, None),
    "whitespace_content_no_reasoning": ([user("a"), assistant("  b\n"), user("c"), assistant("\n d ")], None, None),
    "reasoning_blank": ([user("a"), assistant("\n b", " \n "), user("c"), assistant("d", "")], None, None),
    "reasoning_padded": ([user("a"), assistant("b", "\n  padded reasoning  \n"), user("c"),
                          assistant("d", "\n  kept as is  \n")], None, None),
    "think_close_only": ([user("a"), assistant("half thought</think>b"), user("c"),
                          assistant("more</think>\nd")], None, None),
    "think_open_only": ([user("a"), assistant("b<think>unfinished"), user("c"), assistant("<think>cut off")],
                        None, None),
    "reasoning_and_raw_think": ([user("a"), assistant("<think>x</think>b", "r"), user("c"),
                                 assistant("<think>y</think>d", "r2")], None, None),
    "several_think_blocks": ([user("a"), assistant("<think>1</think>b<think>2</think> c"), user("d"),
                              assistant("<think>3</think>e<think>4</think>f")], None, None),
    "assistant_content_none": ([user("a"), assistant(None), user("b"), assistant(None, "only reasoning")],
                               None, None),
    "reasoning_alias_field": ([user("a"), {"role": "assistant", "content": "b", "reasoning": "via reasoning"},
                               user("c"), {"role": "assistant", "content": "d", "reasoning": "kept"}], None, None),
    "tool_call_scalars": ([user("go"), assistant("", None, [call("create_ticket", SCALARS)])],
                          [CREATE_TICKET], None),
    "tool_call_json_string_arguments": ([user("go"), assistant(None, "r", [call("create_ticket", ARGS_JSON)])],
                                        [CREATE_TICKET],
                                        [user("go"), assistant(None, "r", [call("create_ticket", SCALARS)])]),
    "tool_call_several": ([user("go"), assistant("Checking both.", "two lookups", [
        call("lookup_user", {"email": "a@x.io"}, "c1"), call("create_ticket", {"title": "VPN"}, "c2"),
        call("ping", {}, "c3")])], [LOOKUP, CREATE_TICKET, PING], None),
    "tool_call_no_arguments_key": ([user("go"), assistant(None, None, [
        {"id": "c1", "type": "function", "function": {"name": "ping"}}])], [PING], None),
    "tool_call_without_function_wrapper": ([user("go"), assistant("", None, [
        {"name": "lookup_user", "arguments": {"email": "a@x.io"}}])], [LOOKUP], None),
    "tool_call_content_only": ([user("go"), assistant("I will look.", None, [call("lookup_user", {"email": "e"})])],
                               [LOOKUP], None),
    "tool_call_content_whitespace": ([user("go"), assistant("\n  I will look. \n", "\nr\n",
                                                            [call("lookup_user", {"email": "e"})])],
                                     [LOOKUP], None),
    "tool_call_raw_think_content": ([user("go"), assistant("<think>hmm</think>\nLooking.",
                                                           None, [call("lookup_user", {"email": "e"})])],
                                    [LOOKUP], None),
    "tool_calls_empty_list": ([user("a"), assistant("b", "r", []), user("c")], None, None),
    "tool_result_one": (EXCHANGE, [LOOKUP], None),
    "tool_results_several": (EXCHANGE[:1] + [assistant(None, "both", [
        call("lookup_user", {"email": "a"}, "c1"), call("lookup_user", {"email": "b"}, "c2")]),
        tool("U1", "c1"), tool("  U2\n", "c2")], [LOOKUP], None),
    "agent_loop_history": ([system("IT desk."), *EXCHANGE,
                            assistant("Found U1.", "got the id"), user("now open a ticket"),
                            assistant("", "need a title",
                                      [call("create_ticket", {"title": "reset", "urgent": True})]),
                            tool("INC-7"), assistant("Opened INC-7.", "done")], [LOOKUP, CREATE_TICKET], None),
    "history_tool_calls_truncated": ([user("a"), assistant("Let me see.", "secret plan",
                                                           [call("lookup_user", {"email": "e"})]),
                                      tool("U1"), assistant("<think>x</think>\n  Found.\n"), user("b")],
                                     [LOOKUP], None),
    "history_tool_call_raw_think": ([user("a"), assistant("<think>plan</think>\n Looking. ", None,
                                                          [call("lookup_user", {"email": "e"})]),
                                     tool("U1"), user("b")], [LOOKUP], None),
    "history_tool_call_unclosed_think": ([user("a"), assistant("Looking.<think>half", None,
                                                               [call("lookup_user", {"email": "e"})]),
                                          tool("U1"), user("b")], [LOOKUP], None),
    "history_tool_call_empty_content": ([user("a"), assistant(None, None, [call("lookup_user", {"email": "e"})]),
                                         tool("U1"), user("b")], [LOOKUP], None),
    "tool_right_after_system": ([system("s"), tool("orphan result"), user("a")], None, None),
    "tool_first_without_system": ([tool("first"), tool("second"), user("a")], None, None),
    "tool_last": ([user("a"), assistant(None, None, [call("ping", {})]), tool("pong")], [PING], None),
    "tool_results_interleaved": ([user("a"), assistant(None, None, [call("ping", {}, "c1")]), tool("p1", "c1"),
                                  assistant(None, None, [call("ping", {}, "c2")]), tool("p2", "c2"),
                                  assistant("done")], [PING], None),
    # Content that is neither text nor a list of parts (Python API only): NVIDIA's branches for it.
    "content_not_text": ([user(7), assistant(42), user({"k": "v"}), assistant({"k": "v"}, None, [call("ping", {})]),
                          tool(3.5)], [PING], None),
    "system_not_first": ([user("a"), system("late system")], None, None),
    "second_system_message": ([system("first"), user("a"), system("second"), user("b")], None, None),
    "other_role": ([user("a"), {"role": "developer", "content": "dev note"}, user("b")], None, None),
    "content_parts": ([system(parts("sys ", "parts")), user(parts("look ", "here")),
                       assistant(parts("an", "swer"), "r"), user(parts("more")),
                       assistant(parts("calling"), None, [call("ping", {})]), tool(parts("po", "ng"))],
                      [PING],
                      [system("sys parts"), user("look here"), assistant("answer", "r"), user("more"),
                       assistant("calling", None, [call("ping", {})]), tool("pong")]),
    "long_history_truncation": ([user(f"q{i}") if i % 2 == 0 else assistant(f"a{i}", f"r{i}") for i in range(9)]
                                + [assistant("last", "kept")], None, None),
}


def _diff(a, b):
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at {i}: ours {a[max(0, i - 40):i + 40]!r} vs NVIDIA's {b[max(0, i - 40):i + 40]!r}"


def test_enough_shapes():
    assert len(SHAPES) >= 30


@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_nvidia_super_template(name, ours, oracles):
    messages, tools, oracle_messages = SHAPES[name]
    failures = []
    for kwargs in KWARG_SETS:
        expected = _render_oracle(oracles["super"], oracle_messages or messages, tools, kwargs)
        got = _render_ours(ours, messages, tools, kwargs)
        if got != expected:
            failures.append(f"{kwargs}: {_diff(got, expected)}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", ["history_reasoning_field", "tool_result_one", "content_parts"])
def test_matches_nvidia_nano_template_without_low_effort(name, ours, oracles):
    messages, tools, oracle_messages = SHAPES[name]
    for kwargs in KWARG_SETS:
        if kwargs.get("low_effort"):
            continue
        assert _render_ours(ours, messages, tools, kwargs) == _render_oracle(
            oracles["nano"], oracle_messages or messages, tools, kwargs)


def test_known_differences_from_the_old_template(ours):
    """The renderings the issue reported, spelled out, so a reader sees what NVIDIA's template does."""
    history = [user("a"), assistant("b", "r"), user("c")]
    assert "<|im_start|>assistant\n<think></think>\nb<|im_end|>\n" in ours.render(history)
    assert "<|im_start|>assistant\n<think></think>  b<|im_end|>" in ours.render([user("a"), assistant("  b")])
    out = ours.render([user("a"), assistant(None, None, [call("f", {"on": True, "off": None, "n": 1.5})])])
    assert "<parameter=on>\nTrue\n</parameter>\n<parameter=off>\nNone\n</parameter>\n<parameter=n>\n1.5\n" in out
    raw = "half</think>answer"
    assert f"<|im_start|>assistant\n{raw}<|im_end|>" in ours.render([user("a"), assistant(raw)])
    assert ours.render([system("s"), tool("r")], add_generation_prompt=False) == (
        "<|im_start|>system\ns<|im_end|>\n<tool_response>\nr\n</tool_response>\n<|im_end|>\n")


def test_demo_model_ships_this_template():
    demo = ChatTemplate.from_model_dir(DEMO_DIR)
    shipped = ChatTemplate(builtin_template_source("nemotron3"))
    for name in ("agent_loop_history", "content_parts", "tool_call_json_string_arguments"):
        messages, tools, _ = SHAPES[name]
        assert demo.render(messages, tools=tools) == shipped.render(messages, tools=tools)


def test_unusable_arguments_fail_in_both(ours, oracles):
    # NVIDIA's template cannot iterate a string; nemoh decodes JSON text, so only non-JSON text still fails.
    messages = [user("a"), assistant(None, None, [call("f", "not json")])]
    with pytest.raises(TypeError):
        _render_oracle(oracles["super"], messages, None, {})
    with pytest.raises(TemplateError):
        ours.render(messages)


# ---- against transformers itself, and through the tokenizer -------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(DEMO_DIR))


@pytest.mark.parametrize("kwargs", [KWARG_SETS[0], KWARG_SETS[1], KWARG_SETS[-1]])
def test_oracle_is_what_apply_chat_template_renders(hf_tokenizer, oracles, kwargs):
    source = SUPER_TEMPLATE.read_text(encoding="utf-8")
    for name, (messages, tools, oracle_messages) in SHAPES.items():
        messages = oracle_messages or messages
        hf = hf_tokenizer.apply_chat_template(messages, tools=tools, chat_template=source, tokenize=False, **kwargs)
        assert hf == _render_oracle(oracles["super"], messages, tools, kwargs), name


@pytest.mark.parametrize("name", ["agent_loop_history", "whitespace_after_think", "tool_call_scalars",
                                  "unicode_and_markup", "tool_right_after_system"])
def test_token_ids_match(name, ours, hf_tokenizer):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))
    source = SUPER_TEMPLATE.read_text(encoding="utf-8")
    messages, tools, oracle_messages = SHAPES[name]
    for kwargs in (KWARG_SETS[0], KWARG_SETS[-1]):
        expected = hf_tokenizer.apply_chat_template(oracle_messages or messages, tools=tools, chat_template=source,
                                                    tokenize=True, return_dict=False, **kwargs)
        got = tokenizer.encode(_render_ours(ours, messages, tools, kwargs), add_special_tokens=False).ids
        assert got == list(expected)

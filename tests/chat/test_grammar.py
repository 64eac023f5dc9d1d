"""Grammars from requests: what each lets through, what it refuses, and that the parser reads back what it allows."""
import json

import pytest
from tokenizers import Tokenizer

from nemoh.chat.grammar import GrammarError, response_format_constraint, tool_constraint
from nemoh.chat.tools import Qwen3CoderToolParser
from nemoh.engine.grammar_compiler import GrammarCompiler
from checkpoints import DEMO_DIR

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"enum": ["c", "f"]},
        "label": {"type": ["string", "null"]},
        "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "exact": {"type": "boolean"},
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "short": {"type": "string", "maxLength": 5},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "où": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"],
               "additionalProperties": False},
    },
    "required": ["city", "unit"],
}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler.from_tokenizer(tokenizer, 4096, [2, 11])


def accepts(compiler, tokenizer, constraint, text: str) -> bool:
    matcher = compiler.matcher(constraint.grammar, constraint.param)
    return all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False).ids) \
        and matcher.is_accepting()


def call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


GOOD = call("get_weather", city="Paris </parameter> ok", days="3", unit="c", label="None", limit="5", exact="True",
            code="ABC", short="ab", tags='["a", "b"]', où='{"x": 1.5}')
GOOD_ARGS = {"city": "Paris </parameter> ok", "days": 3, "unit": "c", "label": None, "limit": 5, "exact": True,
             "code": "ABC", "short": "ab", "tags": ["a", "b"], "où": {"x": 1.5}}


@pytest.mark.parametrize("text, ok", [
    ("\n" + GOOD, True),
    (GOOD + "\n" + call("get_time"), True),                                    # several calls
    (call("get_weather", city="x", unit="c"), True),                           # optional ones left out
    (call("get_weather", unit="c", city="x"), False),                          # schema order
    (call("get_weather", city="x"), False),                                    # a required one missing
    (call("get_weather", city="x", unit="k"), False),                          # not in the enum
    (call("get_weather", city="x", days="15", unit="c"), False),               # above the maximum
    (call("get_weather", city="x", unit="c", code="ABCD"), False),             # pattern
    (call("get_weather", city="x", unit="c", short="abcdef"), False),          # maxLength
    (call("get_weather", city="x", unit="c", tags='["a", "b", "c"]'), False),  # maxItems
    (call("get_weather", city="x", unit="c", où='{"x": 1, "y": 2}'), False),   # additionalProperties
    (call("get_weather", city="x", unit="c", wind="3"), False),                # undeclared parameter
    (call("get_weather", city="a\n</parameter>\n<parameter=unit>\nc", unit="c"), False),  # value faking an end
    (call("get_weather", city="<parameter=x", unit="c"), False),               # what the parser reads as a tag
    (call("get_forecast", city="x"), False),                                   # not an offered tool
    ("I think I'll call it. " + GOOD, False),                                  # text before a required call
    ("", False),
])
def test_required_tool_grammar(compiler, tokenizer, text, ok):
    constraint = tool_constraint([WEATHER, CLOCK], "required", None, compiler.marker)
    assert accepts(compiler, tokenizer, constraint, text) is ok


def test_what_the_grammar_lets_through_parses_back(compiler, tokenizer):
    constraint = tool_constraint([WEATHER, CLOCK], "required", None, compiler.marker)
    assert accepts(compiler, tokenizer, constraint, GOOD)
    parsed = Qwen3CoderToolParser([WEATHER, CLOCK]).extract(GOOD)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", GOOD_ARGS)]


def test_named_choice_and_parallel_false(compiler, tokenizer):
    named = tool_constraint([WEATHER, CLOCK], {"type": "function", "function": {"name": "get_time"}}, None,
                            compiler.marker)
    assert named.param == "tool_choice"
    assert accepts(compiler, tokenizer, named, call("get_time"))
    assert not accepts(compiler, tokenizer, named, GOOD)
    single = tool_constraint([WEATHER, CLOCK], "required", False, compiler.marker)
    assert accepts(compiler, tokenizer, single, call("get_time"))
    assert not accepts(compiler, tokenizer, single, call("get_time") + "\n" + call("get_time"))
    with pytest.raises(GrammarError):
        tool_constraint([WEATHER], {"type": "function", "function": {"name": "nope"}}, None, compiler.marker)


def test_auto_allows_text_or_offered_calls(compiler, tokenizer):
    auto = tool_constraint([WEATHER, CLOCK], "auto", None, compiler.marker)
    assert accepts(compiler, tokenizer, auto, "Just an answer, no call.")
    assert accepts(compiler, tokenizer, auto, "Let me look.\n" + call("get_time"))
    assert not accepts(compiler, tokenizer, auto, "Let me look.\n" + call("get_forecast", city="x"))
    assert tool_constraint([WEATHER], "none", None, compiler.marker) is None


def test_special_token_markers(compiler):
    # the demo tokenizer has <tool_call> as one added token: the grammar asks for that token
    assert compiler.marker("<tool_call>") == "<[6]>"
    assert compiler.marker("<function=") == '"<function="'


@pytest.mark.parametrize("response_format, text, ok", [
    ({"type": "json_object"}, '{"a": [1, 2]}', True),
    ({"type": "json_object"}, '[1, 2]', False),
    ({"type": "json_object"}, '{"a":1}', False),          # compact separators only: ", " and ": "
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "properties": {"ñame": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["ñame"], "additionalProperties": False}}}, '{"ñame": "ü", "n": 3}', True),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}, '{}', False),
])
def test_response_format_grammar(compiler, tokenizer, response_format, text, ok):
    constraint = response_format_constraint(response_format)
    assert accepts(compiler, tokenizer, constraint, text) is ok


@pytest.mark.parametrize("schema, why", [
    ({"type": "foo"}, "foo"),
    ({"type": "string", "minLength": "x"}, "minLength"),
    ({"$ref": "#/$defs/missing"}, "missing"),
    ({"type": "string", "pattern": "(unclosed"}, "unclosed"),
    ({"not": {"type": "string"}}, "not"),
])
def test_bad_schemas_are_refused_with_the_reason(compiler, schema, why):
    constraint = response_format_constraint({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    with pytest.raises(GrammarError) as e:
        compiler.matcher(constraint.grammar, constraint.param)
    assert why in str(e.value) and e.value.param == "response_format.json_schema.schema"


def test_limits_and_cache(tokenizer):
    compiler = GrammarCompiler.from_tokenizer(tokenizer, 4096, [2, 11])
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(40_000)}}
    with pytest.raises(GrammarError, match="too large"):
        response_format_constraint({"type": "json_schema", "json_schema": {"name": "x", "schema": big}})
    constraint = response_format_constraint({"type": "json_object"})
    first = compiler.matcher(constraint.grammar, constraint.param)
    second = compiler.matcher(constraint.grammar, constraint.param)
    assert first is not second and compiler.num_compiled == 1 and compiler.num_cached == 1
    slow = GrammarCompiler.from_tokenizer(tokenizer, 4096, [2, 11], timeout_s=1e-6)
    with pytest.raises(GrammarError, match="longer than"):
        tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": WEATHER["function"]["parameters"]}}
                 for i in range(20)]
        c = tool_constraint(tools, "required", None, slow.marker)
        slow.matcher(c.grammar, c.param)

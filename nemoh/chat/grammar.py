"""What a request constrains its output to, written as a Lark grammar for the grammar library (llguidance).

The grammar covers the reply after the think block (the engine starts the constraint there, so reasoning stays
free). Three kinds:

- ``response_format`` json_object / json_schema: one JSON value, written compactly with ``", "`` and ``": "``
  (as ``json.dumps`` writes it) so that a model cannot pad it with unbounded whitespace;
- ``tool_choice`` "required" / named: one or more calls (one when ``parallel_tool_calls`` is false) in the
  model's own qwen3_coder format (REFERENCE §5), each to an offered function, its parameters in the order the
  schema declares them, every required one present, none undeclared, each value matching its schema;
- ``tool_choice`` "auto": free text that never spells ``<tool_call>``, then optionally such calls.

A parameter VALUE is raw text for a schema that accepts strings (the parser keeps it a string) and compact JSON
otherwise (booleans and null also as Python writes them, ``True`` / ``None``, which the parser reads). A raw value
ends at the first ``\\n</parameter>\\n``, and never holds what the parser could read as the end of a parameter
(``<parameter=``, ``</function>``, or ``</parameter>`` followed by either), so the parser recovers exactly the value
the grammar let through. (The parser reads example calls nested in a value; the grammar does not write them.)

Building a grammar never touches the library: `compile` in nemoh/engine/grammar_compiler.py checks and compiles
it, and turns a schema the library cannot express into a 400.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nemoh.chat.json_schema import is_plain_string, is_string_branch, value_branches
from nemoh.chat.qwen3_coder_markup import TOOL_CALL_END, TOOL_CALL_START

# JSON as json.dumps writes it; no free whitespace (a random model would otherwise emit it without end)
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_LEADING_WS = r"/[ \t\r\n]{0,4}/"
_ANY = "(?s:.*)"
MAX_SCHEMA_CHARS = 512 * 1024


class GrammarError(ValueError):
    """A request whose constraint cannot be built; `param` names the request field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Constraint:
    """A grammar for the reply, and the request field it came from (for error messages)."""

    grammar: str
    param: str


def json_string(text: str) -> str:
    """A Lark string literal for text."""
    return json.dumps(text, ensure_ascii=False)


def _json_rule(schema: Any, defs: dict[str, Any] | None = None) -> str:
    """An inline JSON-schema rule; `defs`: the enclosing schema's $defs / definitions, which $refs point into."""
    if not isinstance(schema, dict):
        schema = {} if schema is True else {"not": {}}
    return "%json " + json.dumps({**(defs or {}), **schema, "x-guidance": JSON_STYLE}, ensure_ascii=False)


def _check_size(schema: Any, param: str) -> None:
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError) as e:
        raise GrammarError(f"the schema is not JSON: {e}", param) from None
    if size > MAX_SCHEMA_CHARS:
        raise GrammarError(f"the schema is too large ({size} characters, at most {MAX_SCHEMA_CHARS})", param)


# ---------------------------------------------------------------------------------------- response_format
def response_format_constraint(response_format: dict[str, Any] | None) -> Constraint | None:
    """The constraint of a `response_format` (None for text). Raises GrammarError."""
    if not response_format or response_format.get("type") in (None, "text"):
        return None
    kind = response_format["type"]
    if kind == "json_object":
        schema: Any = {"type": "object"}
        param = "response_format"
    elif kind == "json_schema":
        param = "response_format.json_schema"
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise GrammarError("response_format json_schema needs a 'json_schema' object", param)
        schema = spec.get("schema", spec.get("schema_", {}))
        if not isinstance(schema, (dict, bool)):
            raise GrammarError("json_schema.schema must be a JSON schema object", f"{param}.schema")
        param = f"{param}.schema"
    else:
        raise GrammarError(f"unknown response_format type {kind!r}", "response_format.type")
    _check_size(schema, param)
    return Constraint(f"start: {_LEADING_WS} value\nvalue: {_json_rule(schema)}\n", param)


# ---------------------------------------------------------------------------------------- tool calls
class _ToolGrammar:
    """Builds the rules of the calls one at a time; `rules` holds them in order."""

    def __init__(self, marker: Callable[[str], str]) -> None:
        self.marker = marker
        self.rules: list[str] = []
        self._count = 0
        self._defs: dict[str, Any] = {}

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def call(self, tool: dict[str, Any]) -> str:
        fn = tool.get("function", tool)
        name, schema = fn["name"], fn.get("parameters") or {}
        rule = self._name("call")
        params = self._parameters(schema)
        body = " ".join([self.marker(TOOL_CALL_START), json_string(f"\n<function={name}>\n"), *params,
                         json_string("</function>\n"), self.marker(TOOL_CALL_END)])
        self.rules.append(f"{rule}: {body}")
        return rule

    def _parameters(self, schema: dict[str, Any]) -> list[str]:
        self._defs = {k: schema[k] for k in ("$defs", "definitions") if isinstance(schema.get(k), dict)}
        properties = schema.get("properties")
        required = set(schema.get("required") or [])
        if not isinstance(properties, dict):
            if schema.get("additionalProperties") is False or required:
                return []
            # parameters not declared at all: any names, raw values
            rule = self._name("free")
            self.rules.append(f"{rule}: ({json_string('<parameter=')} /[^>\\n<]+/ {json_string('>' + chr(10))} "
                              f"{self._text_value(_ANY)})*")
            return [rule]
        items = []
        for key, value_schema in properties.items():
            rule = self._name("param")
            self.rules.append(f"{rule}: {json_string(f'<parameter={key}>' + chr(10))} {self._value(value_schema)}")
            items.append(rule if key in required else f"{rule}?")
        return items

    def _text_value(self, regex: str) -> str:
        """A raw VALUE matching regex, with its end tag: it ends at the first "\\n</parameter>\\n" where regex
        is satisfied, and never holds what the parser reads as the end of a parameter."""
        rule = self._name("text")
        end = r"\n<\/parameter>\n"
        self.rules.append(f"{rule}[lazy]: /(?:{regex}){end}/ & ~/{_ANY}(<parameter=|<\\/function>|<\\/parameter>"
                          f"[ \\t\\r\\n]*(<parameter=|<\\/function>)){_ANY}/")
        return rule

    def _value(self, schema: Any) -> str:
        branches = value_branches(schema)
        if any(is_plain_string(b) for b in branches):
            return self._text_value(_ANY)
        end = json_string("\n</parameter>\n")
        texts, others = [], []
        for b in branches:
            if is_string_branch(b):
                texts.append(_string_text(b))
            elif isinstance(b, dict) and b.get("type") == "null":
                others.append('"null" | "None"')
            elif isinstance(b, dict) and b.get("type") == "boolean" and "enum" not in b and "const" not in b:
                others.append('"true" | "false" | "True" | "False"')
            else:
                others.append(_json_rule(b, self._defs))
        alternatives = [self._text_value(regex) for regex in texts]
        if others:
            alternatives.append(f"({' | '.join(others)}) {end}")
        rule = self._name("value")
        self.rules.append(f"{rule}: " + " | ".join(alternatives))
        return rule


def _string_text(schema: dict[str, Any]) -> str:
    """A regex for the raw text of a string schema: enum / const / pattern / minLength / maxLength."""
    if "enum" in schema:
        return "|".join(_literal_regex(v) for v in schema["enum"])
    if "const" in schema:
        return _literal_regex(schema["const"])
    parts = []
    lo, hi = schema.get("minLength", 0), schema.get("maxLength")
    if not isinstance(lo, int) or hi is not None and not isinstance(hi, int) or hi is not None and hi < lo:
        raise GrammarError("minLength / maxLength must be integers with minLength <= maxLength", "tools")
    if lo or hi is not None:
        parts.append(f"(?s:.){{{lo},{'' if hi is None else hi}}}")
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        parts.append(_pattern_regex(pattern))
    return ")&(".join(parts).join("()") if len(parts) > 1 else parts[0] if parts else _ANY


def _pattern_regex(pattern: str) -> str:
    """A JSON-schema pattern (a search, unless anchored) as a full-match regex for the lexer."""
    from llguidance import regex_to_lark

    head = "" if pattern.startswith("^") else _ANY
    tail = "" if pattern.endswith("$") and not pattern.endswith("\\$") else _ANY
    core = pattern[1 if pattern.startswith("^") else 0: len(pattern) - (1 if tail == "" else 0)]
    return f"{head}(?:{regex_to_lark(core, 'dw')}){tail}"


def _literal_regex(text: str) -> str:
    return "".join("\\" + c if c in "\\/.^$*+?()[]{}|" else ("\\n" if c == "\n" else c) for c in text)


def tool_constraint(tools: list[dict[str, Any]], tool_choice: Any, parallel_tool_calls: bool | None,
                    marker: Callable[[str], str]) -> Constraint | None:
    """The constraint of a tool_choice ("none" -> None). `marker(text)` gives the Lark for a tag that may be one
    special token of the tokenizer (``<tool_call>``), so that the grammar asks for the token the model was trained
    on. Raises GrammarError."""
    if not tools or tool_choice == "none":
        return None
    named = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    offered = [t for t in tools if named is None or t.get("function", t).get("name") == named]
    if not offered:
        raise GrammarError(f"tool_choice names function {named!r}, which is not in tools", "tool_choice")
    for tool in offered:
        _check_size(tool.get("function", tool).get("parameters") or {}, "tools")
    g = _ToolGrammar(marker)
    calls = " | ".join(g.call(t) for t in offered)
    repeat = "" if parallel_tool_calls is False else f" ({json_string(chr(10))} call)*"
    rules = [f"call: {calls}", f"calls: call{repeat} {_LEADING_WS}", *g.rules]
    if tool_choice == "auto":
        start = "TEXT calls?"
        rules.append(f"TEXT: /{_ANY}/ & ~/{_ANY}{_literal_regex(TOOL_CALL_START)}{_ANY}/")
        param = "tools"
    else:
        start = f"{_LEADING_WS} calls"
        param = "tool_choice" if named else "tools"
    return Constraint("\n".join([f"start: {start}", *rules]) + "\n", param)



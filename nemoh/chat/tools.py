"""Tool-call parsers: find tool calls in generated text and turn them into OpenAI tool calls.

``qwen3_coder`` (the Nemotron 3 format, REFERENCE §5)::

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    </function>
    </tool_call>

Rules:

- A block is a call when its body is one or more ``<function=NAME>...</function>`` (whitespace
  around them only) with a non-empty NAME that the request's tools define (any name when no tools
  are given), and each function body is only ``<parameter=ARG>VALUE</parameter>`` items (a missing
  ``</parameter>`` is tolerated before the next ``<parameter=`` or ``</function>``). Anything
  else - unknown function, no ``</function>``, stray text, ``<parameter>`` without ``=`` - is
  malformed and its raw text stays in ``content``. Parsing never raises.
- A ``<tool_call>`` that is never closed still counts when its function block is complete at the
  end of the text (the model stopped right after ``</function>``).
- VALUE loses exactly one leading and one trailing newline, then is converted by the parameter's
  JSON-schema type: string stays text; integer, number, boolean, null, object, array are parsed
  (JSON, or Python-literal forms such as ``True``/``None``/``{'a': 1}``); when that fails the text
  is kept. Unknown types and undeclared parameters: JSON if it parses, else text.
- Whitespace between calls, and whitespace before the first call or after the last one, is dropped
  from ``content``; all other text is kept verbatim, including text after the calls (with the
  whitespace that leads up to it).

Streaming: a block is held until it is complete (``</tool_call>``, or the end of the text), then
its call goes out as two deltas (id + name, then the whole arguments JSON) or its raw text goes out
as content. ``extract`` is the same scanner run on the whole text, so a stream always reassembles
to exactly the non-streaming result.
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nemoh.chat.reasoning import partial_suffix_len

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_FUNCTION_RE = re.compile(r"\s*<function=([^>\n]*)>(.*?)</function>\s*", re.DOTALL)
_PARAMETER_RE = re.compile(r"\s*<parameter=([^>\n]*)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL)
# Python-literal parsing of larger values is refused (ast is slow and deep input can exhaust the stack).
_MAX_LITERAL_CHARS = 100_000
_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as in the OpenAI API


@dataclass
class ToolParseResult:
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class ToolCallDelta:
    """One piece of a streamed tool call; the first for an index carries id and name."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments_fragment: str | None = None


@dataclass
class ToolDelta:
    """Either a content text delta or a tool-call delta."""

    content: str | None = None
    tool_call: ToolCallDelta | None = None


def make_tool_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


TOOL_PARSERS: dict[str, type] = {}


def register_tool_parser(name: str) -> Callable[[type], type]:
    def register(cls: type) -> type:
        TOOL_PARSERS[name] = cls
        return cls

    return register


def get_tool_parser(name: str) -> type:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}; known: {sorted(TOOL_PARSERS)}") from None


def tool_schemas(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
    """Map function name -> its parameters' ``properties``; tolerant of malformed tool entries."""
    if not tools:
        return None
    schemas: dict[str, dict[str, Any]] = {}
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function", tool)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, dict) else None
        schemas[fn["name"]] = props if isinstance(props, dict) else {}
    return schemas


@register_tool_parser("qwen3_coder")
class Qwen3CoderToolParser:
    def __init__(self, tools: list[dict[str, Any]] | None = None,
                 id_generator: Callable[[], str] | None = None) -> None:
        self._tools = tools
        self._schemas = tool_schemas(tools)
        self._new_id = id_generator or make_tool_call_id
        self._pending = ""  # text that may be the start of "<tool_call>"
        self._in_block = False  # inside a "<tool_call>" block, which is held until it ends
        self._block_parts: list[str] = []
        self._block_len = 0
        self._block_tail = ""  # the block's last characters, where a split end tag may begin
        self._held_ws = ""  # whitespace waiting to learn whether a call follows it
        self._after_call = False  # nothing but whitespace since the last call
        self._num_calls = 0

    # -- non-streaming ---------------------------------------------------------------------------

    def extract(self, text: str) -> ToolParseResult:
        """Parse a whole generation (uses a fresh scanner, so it does not disturb a stream)."""
        scanner = Qwen3CoderToolParser(self._tools, self._new_id)
        content: list[str] = []
        calls: dict[int, ToolCall] = {}
        for d in scanner.feed(text) + scanner.finish():
            if d.content is not None:
                content.append(d.content)
            elif d.tool_call is not None:
                tc = d.tool_call
                call = calls.setdefault(tc.index, ToolCall(tc.id or "", tc.name or "", ""))
                call.arguments += tc.arguments_fragment or ""
        return ToolParseResult("".join(content) or None, [calls[i] for i in sorted(calls)])

    # -- streaming -------------------------------------------------------------------------------

    def feed(self, delta: str) -> list[ToolDelta]:
        return self._scan(delta, final=False)

    def finish(self) -> list[ToolDelta]:
        return self._scan("", final=True)

    def _scan(self, text: str, final: bool) -> list[ToolDelta]:
        out: list[ToolDelta] = []
        while True:
            if self._in_block:
                cut = self._find_block_end(text)
                if cut is None:
                    self._append_block(text)
                    if not final:
                        return out
                    block, text = "".join(self._block_parts), ""
                    self._resolve_block(block, out)
                else:
                    position, malformed = cut
                    whole = "".join(self._block_parts) + text
                    block, text = whole[:position], whole[position:]
                    self._resolve_block(block, out, malformed=malformed)
                self._in_block = False
                continue
            text, self._pending = self._pending + text, ""
            start = text.find(TOOL_CALL_START)
            if start != -1:
                self._emit_text(text[:start], out)
                text = text[start:]
                self._in_block = True
                self._block_parts, self._block_len, self._block_tail = [], 0, ""
                continue
            hold = 0 if final else partial_suffix_len(text, TOOL_CALL_START)
            self._emit_text(text[: len(text) - hold], out)
            self._pending = text[len(text) - hold:]
            if final:
                if self._held_ws and not self._after_call:
                    self._content(self._held_ws, out)
                self._held_ws = ""
            return out

    def _find_block_end(self, text: str) -> tuple[int, bool] | None:
        """Where the open block ends in (block so far + text): after ``</tool_call>``, or before a
        new ``<tool_call>`` (then the open block is malformed). Only the new text and a short tail
        of the block are searched, so a long streamed call costs linear time."""
        window = self._block_tail + text
        base = self._block_len - len(self._block_tail)  # block position of window[0]
        end = window.find(TOOL_CALL_END)
        restart = window.find(TOOL_CALL_START, max(0, 1 - base))
        if end != -1 and (restart == -1 or end < restart):
            return base + end + len(TOOL_CALL_END), False
        if restart != -1:
            return base + restart, True
        return None

    def _append_block(self, text: str) -> None:
        self._block_parts.append(text)
        self._block_len += len(text)
        self._block_tail = (self._block_tail + text)[-(len(TOOL_CALL_END) - 1):]

    def _emit_text(self, text: str, out: list[ToolDelta]) -> None:
        # Trailing whitespace waits: it is dropped if a call or the end follows a call.
        text = self._held_ws + text
        body = text.rstrip()
        self._held_ws = text[len(body):]
        if body:
            self._after_call = False
        self._content(body, out)

    def _content(self, text: str, out: list[ToolDelta]) -> None:
        if text:
            out.append(ToolDelta(content=text))

    def _resolve_block(self, block: str, out: list[ToolDelta], malformed: bool = False) -> None:
        calls = None if malformed else self._parse_block(block)
        if calls is None:
            self._content(self._held_ws + block, out)
            self._held_ws = ""
            self._after_call = False
            return
        self._held_ws = ""
        self._after_call = True
        for name, arguments in calls:
            index = self._num_calls
            self._num_calls += 1
            out.append(ToolDelta(tool_call=ToolCallDelta(index=index, id=self._new_id(), name=name)))
            out.append(ToolDelta(tool_call=ToolCallDelta(index=index, arguments_fragment=arguments)))

    def _parse_block(self, block: str) -> list[tuple[str, str]] | None:
        """The (name, arguments JSON) of each function in a block, or None if it is not a valid call."""
        body = block[len(TOOL_CALL_START):]
        if body.endswith(TOOL_CALL_END):
            body = body[: -len(TOOL_CALL_END)]
        calls: list[tuple[str, str]] = []
        pos = 0
        while pos < len(body):
            m = _FUNCTION_RE.match(body, pos)
            if m is None:
                break
            name = m.group(1).strip()
            if not name or (self._schemas is not None and name not in self._schemas):
                return None
            arguments = self._parse_parameters(m.group(2), (self._schemas or {}).get(name, {}))
            if arguments is None:
                return None
            calls.append((name, arguments))
            pos = m.end()
        if not calls or body[pos:].strip():
            return None
        return calls

    def _parse_parameters(self, body: str, properties: dict[str, Any]) -> str | None:
        args: dict[str, Any] = {}
        pos = 0
        while pos < len(body):
            m = _PARAMETER_RE.match(body, pos)
            if m is None or m.end() == pos:
                break
            name = m.group(1).strip()
            if not name:
                return None
            args[name] = convert_value(_strip_one_newline(m.group(2)), properties.get(name))
            pos = m.end()
        if body[pos:].strip():
            return None
        try:
            return json.dumps(args, ensure_ascii=False, allow_nan=False)
        except ValueError:
            return None


def _strip_one_newline(value: str) -> str:
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def convert_value(text: str, schema: Any) -> Any:
    """Convert a raw parameter VALUE by its JSON schema; keeps ``text`` when conversion fails."""
    types = _schema_types(schema)
    if not types:
        ok, value = _loads_json(text)
        return value if ok else text
    if "string" in types and len(types) == 1:
        return text
    for type_name in types:
        if type_name == "string":
            continue
        ok, value = _CONVERTERS.get(type_name, _convert_any)(text.strip())
        if ok:
            return value
    return text


def _schema_types(schema: Any) -> list[str]:
    if not isinstance(schema, dict):
        return []
    t = schema.get("type")
    if isinstance(t, str):
        return [t]
    if isinstance(t, list):
        return [x for x in t if isinstance(x, str)]
    if "enum" in schema and isinstance(schema["enum"], list) and schema["enum"]:
        if all(isinstance(v, str) for v in schema["enum"]):
            return ["string"]
    return []


def _loads_json(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return False, None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a float")  # json.dumps could not write it back
    return value


def _literal(text: str) -> tuple[bool, Any]:
    if len(text) > _MAX_LITERAL_CHARS:
        return False, None
    try:
        return True, ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None


def _convert_integer(text: str) -> tuple[bool, Any]:
    try:
        return True, int(text)
    except ValueError:
        pass
    ok, value = _loads_json(text)
    if ok and isinstance(value, float) and value.is_integer():
        return True, int(value)
    return False, None


def _convert_number(text: str) -> tuple[bool, Any]:
    ok, value = _loads_json(text)
    if ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        return True, value
    try:
        value = float(text)
    except ValueError:
        return False, None
    return (True, value) if math.isfinite(value) else (False, None)


def _convert_boolean(text: str) -> tuple[bool, Any]:
    lowered = text.lower()
    if lowered == "true":
        return True, True
    if lowered == "false":
        return True, False
    return False, None


def _convert_null(text: str) -> tuple[bool, Any]:
    return (True, None) if text.lower() in ("null", "none") else (False, None)


def _convert_container(kind: type) -> Callable[[str], tuple[bool, Any]]:
    def convert(text: str) -> tuple[bool, Any]:
        for parse in (_loads_json, _literal):
            ok, value = parse(text)
            if ok and isinstance(value, kind):
                try:
                    json.dumps(value, allow_nan=False)  # Python literals may hold sets, bytes, nan...
                except (TypeError, ValueError, RecursionError):
                    continue
                return True, value
        return False, None

    return convert


def _convert_any(text: str) -> tuple[bool, Any]:
    return _loads_json(text)


_CONVERTERS: dict[str, Callable[[str], tuple[bool, Any]]] = {
    "integer": _convert_integer,
    "number": _convert_number,
    "boolean": _convert_boolean,
    "null": _convert_null,
    "object": _convert_container(dict),
    "array": _convert_container(list),
}

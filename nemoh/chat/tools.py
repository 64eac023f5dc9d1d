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

import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nemoh.chat.reasoning import partial_suffix_len
from nemoh.chat.qwen3_coder_markup import (FUNCTION_END, FUNCTION_START, LONGEST_TAG, TOOL_CALL_END,
                                           TOOL_CALL_START, block_body, parse_functions, settle_open_block)
from nemoh.chat.tool_values import convert_value

_BLOCK_TAGS = re.compile(r"<tool_call>|</tool_call>|<function=|</function>")
_WS = " \t\r\n"
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
        self._pending = ""  # text that may be the start of "<tool_call>" or "<function="
        self._block_kind: str | None = None  # "call" or "bare" (no <tool_call>) in a block, held until it ends
        self._level = 0  # open tags of the block's kind: the block ends when they are all closed
        self._swallow_end = False  # a bare call just ended: a "</tool_call>" after it is its own
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
            if self._block_kind is not None:
                text = self._scan_block(text, final, out)
                if text is None:
                    return out
                continue
            text, self._pending = self._pending + text, ""
            if self._swallow_end:
                text = self._drop_orphan_end(text, final)
                if text is None:
                    return out
            start = _first_start(text)
            if start != -1:
                self._emit_text(text[:start], out)
                text = text[start:]
                self._block_kind = "call" if text.startswith(TOOL_CALL_START) else "bare"
                self._block_parts, self._block_len, self._block_tail, self._level = [], 0, "", 0
                continue
            hold = 0 if final else max(partial_suffix_len(text, TOOL_CALL_START),
                                       partial_suffix_len(text, FUNCTION_START))
            self._emit_text(text[: len(text) - hold], out)
            self._pending = text[len(text) - hold:]
            if final:
                if self._held_ws and not self._after_call:
                    self._content(self._held_ws, out)
                self._held_ws = ""
            return out

    def _scan_block(self, text: str, final: bool, out: list[ToolDelta]) -> str | None:
        """Go on with the open block; returns the text after it once it is resolved, None while it is held."""
        cut = self._find_block_end(text)
        if cut is None:
            self._append_block(text)
            if not final:
                return None
            block = "".join(self._block_parts)
            if self._block_kind == "call":
                length, _ = settle_open_block(block, lambda b: self._parse_block(b) is not None)
            else:
                length = len(block)
            block, text = block[:length], block[length:]
        else:
            whole = "".join(self._block_parts) + text
            block, text = whole[:cut], whole[cut:]
        is_call = self._resolve_block(block, out)
        self._swallow_end = is_call and self._block_kind == "bare"
        self._block_kind = None
        return text

    def _drop_orphan_end(self, text: str, final: bool) -> str | None:
        """After a call whose ``<tool_call>`` was missing, its lone ``</tool_call>`` is dropped (None: wait)."""
        stripped = text.lstrip(_WS)
        if stripped.startswith(TOOL_CALL_END):
            self._swallow_end = False
            return stripped[len(TOOL_CALL_END):]
        if not final and TOOL_CALL_END.startswith(stripped):
            self._pending = text
            return None
        self._swallow_end = False
        return text

    def _find_block_end(self, text: str) -> int | None:
        """Where the open block ends in (block so far + text): after the tag that closes its opening one, counting
        nested pairs (an example call inside a value). Only the new text and a short tail of the block are
        searched, so a long streamed call costs linear time."""
        window = self._block_tail + text
        base = self._block_len - len(self._block_tail)  # block position of window[0]
        opening, closing = (TOOL_CALL_START, TOOL_CALL_END) if self._block_kind == "call" else \
            (FUNCTION_START, FUNCTION_END)
        for m in _BLOCK_TAGS.finditer(window):
            if m.end() <= len(self._block_tail):       # seen with the text before
                continue
            self._level += {opening: 1, closing: -1}.get(m.group(), 0)
            if self._level == 0:
                return base + m.end()
        return None

    def _append_block(self, text: str) -> None:
        self._block_parts.append(text)
        self._block_len += len(text)
        self._block_tail = (self._block_tail + text)[-(LONGEST_TAG - 1):]

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

    def _resolve_block(self, block: str, out: list[ToolDelta]) -> bool:
        """Emit a block as its calls, or as text when it is not a valid call; True for calls."""
        calls = self._parse_block(block)
        if calls is None:
            self._content(self._held_ws + block, out)
            self._held_ws = ""
            self._after_call = False
            return False
        self._held_ws = ""
        self._after_call = True
        for name, arguments in calls:
            index = self._num_calls
            self._num_calls += 1
            out.append(ToolDelta(tool_call=ToolCallDelta(index=index, id=self._new_id(), name=name)))
            out.append(ToolDelta(tool_call=ToolCallDelta(index=index, arguments_fragment=arguments)))
        return True

    def _parse_block(self, block: str) -> list[tuple[str, str]] | None:
        """The (name, arguments JSON) of each function in a block, or None if it is not a valid call."""
        functions = parse_functions(block_body(block), self._schemas)
        if functions is None:
            return None
        try:
            return [(name, json.dumps(args, ensure_ascii=False, allow_nan=False)) for name, args in functions]
        except ValueError:
            return None


def _first_start(text: str) -> int:
    """Where the first block starts: a ``<tool_call>``, or a ``<function=`` whose ``<tool_call>`` is missing."""
    found = [i for i in (text.find(TOOL_CALL_START), text.find(FUNCTION_START)) if i != -1]
    return min(found) if found else -1

"""Reading qwen3_coder markup that may hold markup of its own: where a call block ends, where a value ends.

A parameter VALUE is raw text, so it may hold anything: a file that mentions ``<tool_call>``, a literal
``</parameter>``, or a whole example call. The rules that let the real call win:

- tags inside a value are nested when they are balanced: ``<tool_call>`` ... ``</tool_call>`` and
  ``<function=`` ... ``</function>`` open and close levels, and only tags at level 0 can end the value;
- at level 0 a value ends at ``</parameter>`` followed (after whitespace) by ``<parameter=``, ``</function>`` or
  the end, and tolerates a missing ``</parameter>`` before ``<parameter=`` or a final ``</function>``;
- a ``<tool_call>`` block ends at the ``</tool_call>`` that balances it; a bare ``<function=`` block (its
  ``<tool_call>`` missing) at the ``</function>`` that balances it. An unbalanced block is settled at the end
  of the text by `settle_open_block`.
"""
from __future__ import annotations

import re
from typing import Any

from nemoh.chat.tool_values import convert_value

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
FUNCTION_START = "<function="
FUNCTION_END = "</function>"
PARAMETER_START = "<parameter="
PARAMETER_END = "</parameter>"
_TAGS = re.compile(r"<tool_call>|</tool_call>|<function=|</function>|<parameter=|</parameter>")
_WS = " \t\r\n"
LONGEST_TAG = len(TOOL_CALL_END)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def parse_functions(body: str, schemas: dict[str, dict[str, Any]] | None) -> list[tuple[str, dict]] | None:
    """The (name, arguments) of each ``<function=NAME>...</function>`` in body (whitespace between them only),
    or None when body is not that, or names a function the tools do not define."""
    calls = []
    pos = _skip_ws(body, 0)
    while pos < len(body):
        if not body.startswith(FUNCTION_START, pos):
            return None
        close = body.find(">", pos)
        name = body[pos + len(FUNCTION_START):close].strip() if close != -1 else ""
        if not name or "\n" in name or schemas is not None and name not in schemas:
            return None
        parsed = _parse_parameters(body, close + 1, (schemas or {}).get(name, {}))
        if parsed is None:
            return None
        args, pos = parsed
        calls.append((name, args))
        pos = _skip_ws(body, pos)
    return calls or None


def _parse_parameters(body: str, pos: int, properties: dict[str, Any]) -> tuple[dict, int] | None:
    """The arguments of one function body from pos, and the position after its ``</function>``."""
    args: dict[str, Any] = {}
    while True:
        pos = _skip_ws(body, pos)
        if body.startswith(FUNCTION_END, pos):
            return args, pos + len(FUNCTION_END)
        if not body.startswith(PARAMETER_START, pos):
            return None
        close = body.find(">", pos)
        name = body[pos + len(PARAMETER_START):close].strip() if close != -1 else ""
        if not name or "\n" in name:
            return None
        end, pos = _value_end(body, close + 1)
        args[name] = convert_value(_strip_one_newline(body[close + 1:end]), properties.get(name))


def _value_end(body: str, start: int, nested: bool = True) -> tuple[int, int]:
    """Where the value starting at start ends, and where parsing goes on after its end tag. When the tags nest
    to no end (a value that only mentions ``<tool_call>``), they are read again without nesting."""
    level, was_nested = 0, False
    for m in _TAGS.finditer(body, start):
        tag = m.group()
        if tag in (TOOL_CALL_START, FUNCTION_START) and nested:     # an example call inside the value
            level, was_nested = level + 1, True
        elif tag in (TOOL_CALL_END, FUNCTION_END) and level:
            level -= 1
        elif not level:
            after = _skip_ws(body, m.end())
            ends = after == len(body)
            if tag == PARAMETER_END and (ends or body.startswith((PARAMETER_START, FUNCTION_END), after)):
                return m.start(), m.end()
            if tag == PARAMETER_START:                     # "</parameter>" missing before the next parameter
                return m.start(), m.start()
            if tag == FUNCTION_END and (ends or body.startswith(FUNCTION_START, after)):
                return m.start(), m.start()                # "</parameter>" missing before "</function>"
    return _value_end(body, start, nested=False) if was_nested else (len(body), len(body))


def _strip_one_newline(value: str) -> str:
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def block_body(block: str) -> str:
    """The functions of a block: without its ``<tool_call>`` / ``</tool_call>`` (a bare block has neither)."""
    body = block[len(TOOL_CALL_START):] if block.startswith(TOOL_CALL_START) else block
    stripped = body.rstrip()
    return stripped[: -len(TOOL_CALL_END)] if stripped.endswith(TOOL_CALL_END) else body


def settle_open_block(block: str, parses) -> tuple[int, bool]:
    """An unbalanced ``<tool_call>`` block at the end of the text: (length of the part that is a block, valid).

    The first prefix ending at a ``</tool_call>`` (or the whole block) that `parses` wins; else the block ends
    where a nested ``<tool_call>`` starts (an abandoned call the model started again), or at the end.
    """
    ends = [m.end() for m in re.finditer(re.escape(TOOL_CALL_END), block)] + [len(block)]
    for end in ends:
        if parses(block[:end]):
            return end, True
    restart = block.find(TOOL_CALL_START, 1)
    return (restart if restart != -1 else len(block)), False

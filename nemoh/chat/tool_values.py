"""Typed parameter values: the raw VALUE text of a qwen3_coder parameter, converted by the parameter's JSON schema.

- A schema with a string branch keeps the text as a string when a string branch accepts it (``Optional[str]``
  keeps "42" a string); ``null`` / ``None`` become null when the schema allows null.
- Otherwise each branch's type is tried in order: integer, number, boolean, null, object, array (JSON, or the
  Python-literal forms the chat template writes, such as ``True`` / ``None`` / ``{'a': 1}``); a branch without a
  type (an enum of numbers, a ``$ref``, an unknown type) takes any JSON. When nothing fits, the text is kept.
- A parameter the schema does not declare (or ``{}``) is JSON when it parses and writes back the same (so "1.10"
  stays "1.10", "12" becomes 12), else the text as given.
"""
from __future__ import annotations

import ast
import json
import math
from collections.abc import Callable
from typing import Any

from nemoh.chat.json_schema import allows_null, is_string_branch, string_accepts, value_branches

# Python-literal parsing of larger values is refused (ast is slow and deep input can exhaust the stack).
_MAX_LITERAL_CHARS = 100_000


def convert_value(text: str, schema: Any) -> Any:
    """Convert a raw parameter VALUE by its JSON schema; keeps ``text`` when conversion fails."""
    if not isinstance(schema, dict) or not schema:
        return _untyped(text)
    branches = value_branches(schema)
    if allows_null(schema) and text.strip().lower() in ("null", "none"):
        return None
    strings = [b for b in branches if is_string_branch(b)]
    if any(string_accepts(b, text) for b in strings):
        return text
    for branch in branches:
        if branch in strings or not isinstance(branch, dict):
            continue
        ok, value = _CONVERTERS.get(branch.get("type"), _loads_json)(text.strip())
        if ok:
            return value
    return text


def _untyped(text: str) -> Any:
    ok, value = _loads_json(text)
    if not ok:
        return text
    if isinstance(value, (int, float)) and not isinstance(value, bool) and json.dumps(value) != text.strip():
        return text  # "1.10", "1e3": a number would not write back as given
    return value


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


_CONVERTERS: dict[str, Callable[[str], tuple[bool, Any]]] = {
    "integer": _convert_integer,
    "number": _convert_number,
    "boolean": _convert_boolean,
    "null": _convert_null,
    "object": _convert_container(dict),
    "array": _convert_container(list),
}

"""The few questions about a parameter's JSON schema that the tool parser and the grammar builder both ask.

A schema is read as a list of branches (``anyOf`` / ``oneOf`` / a list of ``type``s, else itself); a branch is
a *string branch* when its values are strings. The qwen3_coder format writes a string's raw text as the VALUE,
so a value whose schema has a string branch is read as a string, unless it is ``null`` / ``None`` and the
schema allows null (Pydantic's ``Optional[str]`` keeps "42" a string and reads ``None`` as null).
"""
from __future__ import annotations

import re
from typing import Any


def value_branches(schema: Any) -> list[Any]:
    """The alternatives of a value schema: the branches of anyOf / oneOf / a list of types, else the schema."""
    if not isinstance(schema, dict):
        return [schema]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            rest = {k: v for k, v in schema.items() if k != key}
            return [b for branch in schema[key]
                    for b in value_branches({**rest, **branch} if isinstance(branch, dict) else branch)]
    if isinstance(schema.get("type"), list) and schema["type"]:
        return [{**schema, "type": t} for t in schema["type"]]
    return [schema]


def is_string_branch(schema: Any) -> bool:
    """A branch whose values are strings (its VALUE is the string's raw text)."""
    if schema is True or schema == {}:
        return True
    if not isinstance(schema, dict):
        return False
    if "enum" in schema and isinstance(schema["enum"], list):
        return bool(schema["enum"]) and all(isinstance(v, str) for v in schema["enum"])
    if "const" in schema:
        return isinstance(schema["const"], str)
    return schema.get("type") == "string"


def is_plain_string(schema: Any) -> bool:
    """A string branch any raw text satisfies."""
    if schema is True or schema == {}:
        return True
    return (is_string_branch(schema) and schema.get("type") == "string"
            and not any(k in schema for k in ("enum", "const", "pattern", "minLength", "maxLength")))


def allows_null(schema: Any) -> bool:
    """null is valid: a null branch, or OpenAPI's ``nullable: true``."""
    if isinstance(schema, dict) and schema.get("nullable") is True:
        return True
    return any(isinstance(b, dict) and b.get("type") == "null" for b in value_branches(schema))


def string_accepts(schema: Any, text: str) -> bool:
    """Whether a string branch accepts text (enum, const, lengths, pattern; formats are not checked)."""
    if schema is True or schema == {} or not isinstance(schema, dict):
        return True
    if "enum" in schema and isinstance(schema["enum"], list) and text not in schema["enum"]:
        return False
    if "const" in schema and text != schema["const"]:
        return False
    lo, hi = schema.get("minLength"), schema.get("maxLength")
    if isinstance(lo, int) and len(text) < lo or isinstance(hi, int) and len(text) > hi:
        return False
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        try:
            return re.search(pattern, text) is not None
        except re.error:
            return True
    return True

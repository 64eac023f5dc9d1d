"""Render a checkpoint's own chat template the way HF transformers does, but safely.

The template is untrusted code (it comes with the checkpoint, or with a request), so it runs in
jinja2's ``ImmutableSandboxedEnvironment`` (no ``__globals__``/``__class__``, no mutation of lists or
dicts) with the same options and helpers as ``transformers.utils.chat_template_utils``: trim_blocks,
lstrip_blocks, the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now`` and a ``tojson``
filter that does not HTML-escape.

On top of the sandbox, three limits keep one bad template from taking the server down:

1. Time: while a template renders, a ``sys.settrace`` tracer watches only the frames compiled from
   the template (their ``co_filename`` is jinja's ``"<template>"``) and raises once ``timeout_s`` has
   passed. Every template loop iteration and macro call is a line event in such a frame, so nested
   huge loops and runaway recursion stop on time; the check costs one clock read per template line.
   The caller's own tracer (debugger, coverage) is put back afterwards.
2. Size: C-level operations that no tracer can interrupt are checked before they run: ``*``,
   ``+`` and ``~`` on strings/lists and the ``join`` filter refuse results above the output cap,
   ``**`` refuses big integer exponents (``2 ** (10 ** 9)``), and any call or filter with an
   integer argument above the cap is refused (``''.ljust(10**9)``, ``''|center(10**9)``); the
   rendered text itself is capped at ``max_output_chars`` (4 MiB); so are format strings with a
   number above the cap (``'%999999999s' % x``, ``'{:>999999999}'.format(x)``, ``|format``).
3. Every failure (syntax, ``raise_exception``, sandbox violation, limit) is one ``TemplateError``.

Messages are prepared as transformers' ``apply_chat_template`` prepares them: copied into plain JSON
data (the template never sees caller objects), keys whose value is None dropped, and a message's
reasoning given as ``reasoning`` or ``thinking`` copied to ``reasoning_content`` (and ``thinking``),
which templates read. One step goes further than HF: a tool call's ``function.arguments`` given as a
JSON string is decoded to an object, because templates (Nemotron 3's included) iterate it with
``|items`` while OpenAI clients send it as a string (vLLM does the same); NVIDIA's Nemotron 3 template
fails on the string. Content given as a list of parts is left to the template (nemoh's Nemotron 3
template joins the text parts; the server joins them before rendering).
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

DEFAULT_TIMEOUT_S = 1.0
DEFAULT_MAX_OUTPUT_CHARS = 4 * 1024 * 1024
# A larger integer exponent is refused: big-int powers run in C, where no tracer can stop them.
_MAX_EXPONENT = 4096
# jinja compiles templates made with from_string() under this file name.
_TEMPLATE_FILENAME = "<template>"
_DIGITS = re.compile(r"\d+")
# The names a message's reasoning comes under; templates read the first (gpt-oss ones the second).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TemplateError(ValueError):
    """A chat template failed to compile or render (syntax, raise_exception, sandbox, limits)."""


class _RenderTimeout(BaseException):
    # BaseException so that no `except Exception` inside jinja's runtime can swallow it.
    pass


class _ChatSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, max_output_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        self.max_output_chars = max_output_chars
        self.filters = {name: self._guard(f) for name, f in self.filters.items()}
        self.filters["tojson"] = self._guard(_tojson)
        self.filters["join"] = self._guard(_checked_filter_join(self.filters["join"], max_output_chars))
        format_filter = self.filters["format"]

        @functools.wraps(format_filter)
        def checked_format(value: Any, *args: Any, **kwargs: Any) -> str:
            self._check_format(value)
            return format_filter(value, *args, **kwargs)

        self.filters["format"] = checked_format
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now

    def from_string(self, source: str, *args: Any, **kwargs: Any) -> jinja2.Template:
        template = super().from_string(source, *args, **kwargs)
        # `a ~ b` compiles to a call of the module-level name `str_join`: give this template's module
        # a version that refuses to build an over-long string instead of building it.
        template.root_render_func.__globals__["str_join"] = _checked_str_join(self.max_output_chars)
        return template

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # The stock sandbox returns an Undefined that renders as ""; refusing outright is clearer.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and _is_int(left) and _is_int(right) and abs(right) > _MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is too large for a chat template")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and _is_int(times):
                    self._check_size(_size(seq) * max(times, 0))
        if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            self._check_size(_size(left) + _size(right))
        if operator == "%":
            self._check_format(left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self._check_int_args(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        # The sandbox hands out its own wrapper for `'...'.format`; check the format string first.
        if isinstance(getattr(value, "__self__", None), str) and getattr(value, "__name__", "") in ("format", "format_map"):
            self._check_format(value.__self__)
        return super().wrap_str_format(value)

    def _guard(self, fn: Any) -> Any:
        # Filters are called directly (not through call()); refuse e.g. ''|center(10**9) the same way.
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self._check_int_args(args, kwargs)
            return fn(*args, **kwargs)

        return guarded

    def _check_int_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for value in (*args, *kwargs.values()):
            if _is_int(value) and abs(value) > self.max_output_chars:
                raise SecurityError(f"integer argument {value} exceeds the chat template output limit")

    def _check_format(self, fmt: Any) -> None:
        # A width or precision is a run of digits; one above the cap would allocate that much.
        if isinstance(fmt, str):
            limit = str(self.max_output_chars)
            for digits in _DIGITS.findall(fmt):
                if len(digits) > len(limit) or int(digits) > self.max_output_chars:
                    raise SecurityError(f"format width {digits[:20]} exceeds the chat template output limit")

    def _check_size(self, size: int) -> None:
        if size > self.max_output_chars:
            raise SecurityError(f"a value of size {size} exceeds the chat template output limit")


def _size(seq: str | list[Any] | tuple[Any, ...]) -> int:
    """Characters of a string; for a list, the characters of its string items (at least 1 each)."""
    if isinstance(seq, str):
        return len(seq)
    return sum(len(x) if isinstance(x, str) else 1 for x in seq)


def _checked_str_join(limit: int) -> Any:
    def str_join(seq: Any) -> str:
        parts = [str(x) for x in seq]
        if sum(len(p) for p in parts) > limit:
            raise SecurityError("string concatenation exceeds the chat template output limit")
        return "".join(parts)

    return str_join


def _checked_filter_join(join: Any, limit: int) -> Any:
    @functools.wraps(join)
    def checked(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
        if isinstance(value, (list, tuple)) and attribute is None:
            if _size(value) + len(d) * len(value) > limit:
                raise SecurityError("join exceeds the chat template output limit")
        return join(eval_ctx, value, d, attribute)

    return checked


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; chat templates want the plain JSON text (as in HF).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Deadline:
    """A trace function that stops template code once the deadline has passed."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    def trace_calls(self, frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != _TEMPLATE_FILENAME:
            return None  # jinja's runtime and our own code run untraced
        self.check()
        return self.trace_lines

    def trace_lines(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            self.check()
        return self.trace_lines

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise _RenderTimeout


@dataclass
class _NamedTemplates:
    default: jinja2.Template
    tool_use: jinja2.Template | None


class ChatTemplate:
    """A compiled chat template plus the special tokens it may reference.

    ``source`` is the template text, or HF's list form ``[{"name": ..., "template": ...}]`` (or a
    ``{name: template}`` dict): ``"default"`` is used, ``"tool_use"`` when tools are given and it exists.
    """

    def __init__(
        self,
        source: str | list[dict[str, str]] | dict[str, str],
        special_tokens: dict[str, str] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_output_chars <= 0:
            raise ValueError(f"max_output_chars must be > 0, got {max_output_chars}")
        self.timeout_s = timeout_s
        self.max_output_chars = max_output_chars
        self.special_tokens = dict(special_tokens or {})
        self._env = _ChatSandbox(max_output_chars)
        named = _named_sources(source)
        if "default" not in named:
            raise TemplateError(f"chat template list has no 'default' entry (names: {sorted(named)})")
        self._templates = _NamedTemplates(
            default=self._compile(named["default"], "default"),
            tool_use=self._compile(named["tool_use"], "tool_use") if "tool_use" in named else None,
        )

    @classmethod
    def from_model_dir(cls, path: str | Path, **kwargs: Any) -> ChatTemplate:
        """Load ``chat_template.jinja``, else ``tokenizer_config.json["chat_template"]``, with its special tokens."""
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        special_tokens: dict[str, str] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            value = _token_text(config.get(key))
            if value is None:
                value = _token_text(special_map.get(key))
            if value is not None:
                special_tokens[key] = value
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            source: Any = jinja_file.read_text(encoding="utf-8")
        elif config.get("chat_template"):
            source = config["chat_template"]
        else:
            raise TemplateError(f"no chat template in {path} (chat_template.jinja or tokenizer_config.json)")
        return cls(source, special_tokens=special_tokens, **kwargs)

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """Render ``messages`` (OpenAI format) to the prompt text; raises TemplateError on any failure."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TemplateError("messages must be a list of dicts")
        template = self._templates.tool_use if tools and self._templates.tool_use else self._templates.default
        context = {
            **self.special_tokens,
            **_plain(template_kwargs),
            "messages": [_normalize_message(m) for m in messages],
            "tools": _plain(tools) if tools is not None else None,
            "add_generation_prompt": bool(add_generation_prompt),
        }
        return self._render_limited(template, context)

    def _compile(self, source: Any, name: str) -> jinja2.Template:
        if not isinstance(source, str):
            raise TemplateError(f"chat template {name!r} must be a string, got {type(source).__name__}")
        try:
            return self._env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template {name!r} has a syntax error at line {e.lineno}: {e.message}") from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template {name!r} failed to compile: {e}") from None

    def _render_limited(self, template: jinja2.Template, context: dict[str, Any]) -> str:
        deadline = _Deadline(self.timeout_s)
        previous_trace = sys.gettrace()
        parts: list[str] = []
        size = 0
        sys.settrace(deadline.trace_calls)
        try:
            for chunk in template.generate(**context):
                size += len(chunk)
                if size > self.max_output_chars:
                    raise TemplateError(f"chat template output exceeds {self.max_output_chars} characters")
                parts.append(chunk)
        except _RenderTimeout:
            raise TemplateError(f"chat template rendering exceeded {self.timeout_s:g} s") from None
        except TemplateError:
            raise
        except jinja2.TemplateError as e:  # raise_exception, SecurityError, UndefinedError
            raise TemplateError(f"chat template error: {e.message or type(e).__name__}") from None
        except RecursionError:
            raise TemplateError("chat template recursed too deeply") from None
        except MemoryError:
            raise TemplateError("chat template ran out of memory") from None
        except Exception as e:  # TypeError, ZeroDivisionError, ... raised by the template's own expressions
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
        finally:
            sys.settrace(previous_trace)
        return "".join(parts)


def _named_sources(source: Any) -> dict[str, Any]:
    if isinstance(source, str):
        return {"default": source}
    if isinstance(source, dict):
        return dict(source)
    if isinstance(source, list):
        named: dict[str, Any] = {}
        for entry in source:
            if not isinstance(entry, dict) or "name" not in entry or "template" not in entry:
                raise TemplateError("a chat template list must hold {'name': ..., 'template': ...} entries")
            named[entry["name"]] = entry["template"]
        return named
    raise TemplateError(f"chat template must be a string or a list of named templates, got {type(source).__name__}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TemplateError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    # tokenizer_config stores a special token as a string or as a serialized AddedToken dict.
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _plain(value: Any) -> Any:
    """A deep copy made only of JSON types: the template never touches a caller's objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return str(value)


def _normalize_message(message: dict[str, Any]) -> dict[str, Any]:
    plain = {k: v for k, v in _plain(message).items() if v is not None}
    reasoning = next((plain[k] for k in _REASONING_FIELDS if k in plain), None)
    if reasoning is not None:
        plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
    tool_calls = plain.get("tool_calls")
    if isinstance(tool_calls, list):
        for call in tool_calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                try:
                    decoded = json.loads(function["arguments"])
                except ValueError:
                    continue  # left as text; a template that needs an object will raise
                if isinstance(decoded, dict):
                    function["arguments"] = decoded
    return plain


BUILTIN_TEMPLATE_DIR = Path(__file__).parent / "templates"


def builtin_template_source(name: str = "nemotron3") -> str:
    """The text of a template shipped with nemoh (``nemoh/chat/templates/{name}.jinja``)."""
    path = BUILTIN_TEMPLATE_DIR / f"{name}.jinja"
    if not path.is_file():
        raise ValueError(f"no built-in chat template {name!r} in {BUILTIN_TEMPLATE_DIR}")
    return path.read_text(encoding="utf-8")

"""Turn a generation into an OpenAI chat message: reasoning, content and tool calls.

The reasoning parser splits the text first; the tool parser then reads the content. A second tool
parser reads the reasoning, because the model sometimes omits ``</think>`` before ``<tool_call>``:
a complete call found there becomes a tool call and leaves the reasoning (REFERENCE §5).

Tool parsing is off when the request has no tools or ``tool_choice == "none"``; a named
``tool_choice`` makes only that function count as a call; ``parallel_tool_calls=False`` returns the first call
only (constrained decoding lets the model write only one). ``force_nonempty_content`` is applied
here rather than in the reasoning parser so that a reply made of tool calls is not given its
reasoning as content: at the end, when there is no content and no tool call, the reasoning text is
sent again as content (see reasoning.py for why it is repeated rather than moved).

``parse`` is ``feed`` + ``finish`` on the whole text, so streaming and non-streaming agree by
construction; the tests check that every split of a text gives the same result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nemoh.chat.reasoning import ReasoningDelta, get_reasoning_parser
from nemoh.chat.tools import ToolCall, ToolCallDelta, ToolDelta, get_tool_parser


@dataclass
class ParsedChat:
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)

    @property
    def has_tool_calls(self) -> bool:
        """Hint for ``finish_reason="tool_calls"``."""
        return bool(self.tool_calls)


@dataclass
class ChatDelta:
    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def is_empty(self) -> bool:
        return self.reasoning is None and self.content is None and not self.tool_calls


def named_tool_choice(tool_choice: Any) -> str | None:
    """The function name of a named tool_choice (``{"type": "function", "function": {"name": ...}}``)."""
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return fn["name"]
    return None


class ChatOutputParser:
    def __init__(
        self,
        reasoning_parser_name: str | None,
        tool_parser_name: str | None,
        tools: list[dict[str, Any]] | None = None,
        thinking_enabled: bool = True,
        force_nonempty_content: bool = False,
        tool_choice: str | dict[str, Any] | None = "auto",
        id_generator: Callable[[], str] | None = None,
        parallel_tool_calls: bool = True,
    ) -> None:
        self._settings = dict(
            reasoning_parser_name=reasoning_parser_name, tool_parser_name=tool_parser_name, tools=tools,
            thinking_enabled=thinking_enabled, force_nonempty_content=force_nonempty_content,
            tool_choice=tool_choice, id_generator=id_generator, parallel_tool_calls=parallel_tool_calls,
        )
        self._max_calls = None if parallel_tool_calls else 1
        self._reasoning = (
            get_reasoning_parser(reasoning_parser_name)(thinking_enabled=thinking_enabled)
            if reasoning_parser_name
            else None
        )
        self._force_nonempty_content = force_nonempty_content and self._reasoning is not None
        self._content_tools = None
        self._reasoning_tools = None
        tools = _tools_for_choice(tools, tool_choice)
        if tool_parser_name and tools:
            parser_cls = get_tool_parser(tool_parser_name)
            self._content_tools = parser_cls(tools, id_generator)
            if self._reasoning is not None:
                self._reasoning_tools = parser_cls(tools, id_generator)
        self._index_map: dict[tuple[int, int], int] = {}  # (which parser, its index) -> response index
        self._reasoning_parts: list[str] = []
        self._has_content = False
        self._reasoning_tools_done = False
        self._finished = False

    def parse(self, text: str) -> ParsedChat:
        """Non-streaming: the whole generation at once (a fresh scanner; a stream in progress is untouched)."""
        scanner = ChatOutputParser(**self._settings)
        reasoning: list[str] = []
        content: list[str] = []
        calls: dict[int, ToolCall] = {}
        for delta in (scanner.feed(text), scanner.finish()):
            if delta.reasoning is not None:
                reasoning.append(delta.reasoning)
            if delta.content is not None:
                content.append(delta.content)
            for tc in delta.tool_calls:
                call = calls.setdefault(tc.index, ToolCall(tc.id or "", tc.name or "", ""))
                call.arguments += tc.arguments_fragment or ""
        return ParsedChat("".join(reasoning) or None, "".join(content) or None, [calls[i] for i in sorted(calls)])

    def feed(self, delta: str) -> ChatDelta:
        if self._finished:
            raise RuntimeError("ChatOutputParser.feed() after finish()")
        split = self._reasoning.feed(delta) if self._reasoning else ReasoningDelta(content=delta)
        return self._route(split, final=False)

    def finish(self) -> ChatDelta:
        if self._finished:
            return ChatDelta()
        split = self._reasoning.finish() if self._reasoning else ReasoningDelta()
        out = self._route(split, final=True)
        self._finished = True
        if (self._force_nonempty_content and not self._has_content and not self._index_map
                and self._reasoning_parts):
            out.content = (out.content or "") + "".join(self._reasoning_parts)
            self._has_content = True
        return out

    def _route(self, split: ReasoningDelta, final: bool) -> ChatDelta:
        out = ChatDelta()
        reasoning_ended = final or (self._reasoning is not None and not self._reasoning.in_reasoning)
        if self._reasoning_tools is not None and not self._reasoning_tools_done:
            items = self._reasoning_tools.feed(split.reasoning) if split.reasoning else []
            if reasoning_ended:
                items += self._reasoning_tools.finish()
                self._reasoning_tools_done = True
            self._collect(items, out, parser_id=1, text_field="reasoning")
        elif split.reasoning:
            self._add(out, "reasoning", split.reasoning)
        if self._content_tools is not None:
            items = self._content_tools.feed(split.content) if split.content else []
            if final:
                items += self._content_tools.finish()
            self._collect(items, out, parser_id=0, text_field="content")
        elif split.content:
            self._add(out, "content", split.content)
        return out

    def _collect(self, items: list[ToolDelta], out: ChatDelta, parser_id: int, text_field: str) -> None:
        for item in items:
            if item.content is not None:
                self._add(out, text_field, item.content)
            elif item.tool_call is not None:
                tc = item.tool_call
                key = (parser_id, tc.index)
                if key not in self._index_map:
                    if self._max_calls is not None and len(self._index_map) >= self._max_calls:
                        continue  # parallel_tool_calls false: only the first call is returned
                    self._index_map[key] = len(self._index_map)
                out.tool_calls.append(ToolCallDelta(self._index_map[key], tc.id, tc.name, tc.arguments_fragment))

    def _add(self, out: ChatDelta, text_field: str, text: str) -> None:
        if not text:
            return
        if text_field == "reasoning":
            self._reasoning_parts.append(text)
            out.reasoning = (out.reasoning or "") + text
        else:
            self._has_content = True
            out.content = (out.content or "") + text


def _tools_for_choice(tools: list[dict[str, Any]] | None, tool_choice: Any) -> list[dict[str, Any]] | None:
    if not tools or tool_choice == "none":
        return None
    name = named_tool_choice(tool_choice)
    if name is None:
        return tools
    chosen = [t for t in tools if isinstance(t, dict) and _tool_name(t) == name]
    return chosen or None


def _tool_name(tool: dict[str, Any]) -> str | None:
    fn = tool.get("function", tool)
    return fn.get("name") if isinstance(fn, dict) else None

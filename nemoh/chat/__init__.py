"""Chat layer: template rendering and output parsing (reasoning, tool calls). Plain Python, no torch."""

from nemoh.chat.output_parser import ChatDelta, ChatOutputParser, ParsedChat
from nemoh.chat.reasoning import (
    REASONING_PARSERS,
    ReasoningDelta,
    ReasoningResult,
    SuperV3ReasoningParser,
    get_reasoning_parser,
    register_reasoning_parser,
)
from nemoh.chat.template import ChatTemplate, TemplateError
from nemoh.chat.tools import (
    TOOL_PARSERS,
    Qwen3CoderToolParser,
    ToolCall,
    ToolCallDelta,
    ToolDelta,
    ToolParseResult,
    get_tool_parser,
    register_tool_parser,
)

__all__ = [
    "REASONING_PARSERS",
    "TOOL_PARSERS",
    "ChatDelta",
    "ChatOutputParser",
    "ChatTemplate",
    "ParsedChat",
    "Qwen3CoderToolParser",
    "ReasoningDelta",
    "ReasoningResult",
    "SuperV3ReasoningParser",
    "TemplateError",
    "ToolCall",
    "ToolCallDelta",
    "ToolDelta",
    "ToolParseResult",
    "get_reasoning_parser",
    "get_tool_parser",
    "register_reasoning_parser",
    "register_tool_parser",
]

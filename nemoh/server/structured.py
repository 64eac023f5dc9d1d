"""Which constraint a chat request gets (structured output), checked and compiled before it reaches the engine.

- ``response_format`` json_object / json_schema → the reply is JSON (valid against the schema);
- ``tool_choice`` "required" / named → one or more calls (one with ``parallel_tool_calls: false``) in the
  qwen3_coder format, to offered functions, with parameters that satisfy their schemas;
- ``tool_choice`` "auto" → free text or such calls, when the server constrains auto tool choice (the default);
  a tool schema the grammar library cannot express then leaves the request unconstrained, as before;
- ``tool_choice`` "none" or no tools → nothing.

The constraint starts after ``</think>`` when thinking is on (reasoning stays free). A schema the library cannot
express, one that is not valid JSON Schema, or a grammar too large or too slow to compile is a 400 naming the
field; compiled grammars are cached by the engine, so this check also warms the cache.
"""
from __future__ import annotations

import logging
from typing import Any

from nemoh.chat.grammar import GrammarError, response_format_constraint, tool_constraint
from nemoh.sampling_params import StructuredOutput
from nemoh.server.errors import bad_request

logger = logging.getLogger("nemoh.server")


def structured_output(engine: Any, req: Any, tools: list[dict[str, Any]] | None, tool_choice: Any,
                      constrain_auto: bool, start_after: tuple[int, ...]) -> StructuredOutput | None:
    """The request's compiled constraint (None: unconstrained). Blocking: run in a thread. Raises APIError (400)."""
    response_format = req.response_format.model_dump(exclude_none=True, by_alias=True) if req.response_format else None
    wants_json = response_format is not None and response_format.get("type") != "text"
    forces_calls = bool(tools) and (tool_choice == "required" or isinstance(tool_choice, dict))
    if wants_json and forces_calls:
        raise bad_request("response_format json_object/json_schema cannot be combined with tool_choice "
                          "\"required\" or a named function", param="response_format")
    if not wants_json and not (tools and (forces_calls or tool_choice == "auto" and constrain_auto)):
        return None
    get_compiler = getattr(engine, "grammar_compiler", None)
    if get_compiler is None and not wants_json and tool_choice == "auto":
        return None                     # an engine without constrained decoding: "auto" as before
    if get_compiler is None:
        raise bad_request("this engine has no constrained decoding", param="response_format" if wants_json else "tools")
    try:
        compiler = get_compiler()
        if wants_json:
            constraint = response_format_constraint(response_format)
        else:
            constraint = tool_constraint(tools, tool_choice, req.parallel_tool_calls, compiler.marker)
        compiler.matcher(constraint.grammar, constraint.param)
    except GrammarError as e:
        if not wants_json and tool_choice == "auto":
            logger.warning("auto tool choice left unconstrained: %s", e)
            return None
        raise bad_request(f"Invalid {e.param}: {e}", param=e.param) from None
    return StructuredOutput(constraint.grammar, constraint.param, start_after)

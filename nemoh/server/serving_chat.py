"""`POST /v1/chat/completions`: messages → checkpoint template → engine → reasoning/tool parsers → OpenAI JSON.

Template switches come from three places, later ones winning: `reasoning_effort` (none/minimal → thinking
off, low → low_effort, medium/high → full thinking), then `chat_template_kwargs`. The reasoning budget
`max_thinking_tokens` may be given at top level or in `chat_template_kwargs` (top level wins); see
generation.py for how the think block is closed when the budget runs out.

tool_choice: "none" renders the tools but does not parse calls; "auto" (the default with tools) needs
`--enable-auto-tool-choice`, as in vLLM, so that tool calls are never silently returned as text.
"required", a named function, "auto" (unless `--no-constrain-auto-tool-choice`) and `response_format`
json_object / json_schema are enforced by constrained decoding after the think block (structured.py).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from nemoh.chat import ChatOutputParser, ChatTemplate, TemplateError
from nemoh.server.errors import APIError, bad_request
from nemoh.server.generation import FORCED_THINK_CLOSE, THINK_END, ChoiceDelta, ChoiceSpec, generate_choices
from nemoh.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
    ChoiceLogprobs,
    DeltaMessage,
    FunctionCall,
    FunctionCallDelta,
    NamedToolChoice,
    ResponseMessage,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    now,
    random_id,
)
from nemoh.server.serving_base import (
    CachedTokens,
    ChoiceAccumulator,
    RequestTimer,
    check_model,
    check_num_choices,
    check_serving,
    choice_seed,
    encode,
    engine_error,
    resolve_max_tokens,
    respond,
    run_sync,
    sampling_params,
    token_text,
    usage,
)
from nemoh.server.settings import ServerState
from nemoh.server.structured import structured_output
from nemoh.server.streaming import DONE, prepend, sse, sse_error

logger = logging.getLogger("nemoh.server")

_BOOL_KWARGS = ("enable_thinking", "low_effort", "truncate_history_thinking", "force_nonempty_content")
# Names the template context sets itself; a request may not override them through chat_template_kwargs.
_RESERVED_KWARGS = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "unk_token",
                              "pad_token", "sep_token", "cls_token", "mask_token", "raise_exception",
                              "strftime_now"})
_EFFORT_KWARGS = {
    "none": {"enable_thinking": False},
    "minimal": {"enable_thinking": False},
    "low": {"enable_thinking": True, "low_effort": True},
    "medium": {"enable_thinking": True, "low_effort": False},
    "high": {"enable_thinking": True, "low_effort": False},
}


def template_kwargs(req: ChatCompletionRequest) -> tuple[dict[str, Any], int | None]:
    """The kwargs the template is rendered with, and the reasoning budget (None: unlimited)."""
    kwargs: dict[str, Any] = dict(_EFFORT_KWARGS.get(req.reasoning_effort or "", {}))
    kwargs.update(req.chat_template_kwargs or {})
    for key in kwargs:
        if key in _RESERVED_KWARGS:
            raise bad_request(f"chat_template_kwargs may not set {key!r}", param="chat_template_kwargs")
    for key in _BOOL_KWARGS:
        if key in kwargs and not isinstance(kwargs[key], bool):
            raise bad_request(f"chat_template_kwargs.{key} must be a boolean", param=f"chat_template_kwargs.{key}")
    budget = kwargs.pop("max_thinking_tokens", None)
    if req.max_thinking_tokens is not None:
        budget = req.max_thinking_tokens
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
        raise bad_request("max_thinking_tokens must be an integer >= 0", param="max_thinking_tokens")
    return kwargs, budget


def message_dicts(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages as the template expects them (OpenAI shapes, text content, `reasoning_content`)."""
    out = []
    for m in req.messages:
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
        if reasoning is not None:
            d["reasoning_content"] = reasoning
        if m.tool_calls:
            d["tool_calls"] = [tc.model_dump() for tc in m.tool_calls]
        out.append(d)
    return out


def tool_choice_value(req: ChatCompletionRequest) -> str | dict[str, Any] | None:
    if isinstance(req.tool_choice, NamedToolChoice):
        return req.tool_choice.model_dump()
    return req.tool_choice


class ChatServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.settings = state.settings
        self.engine = state.engine
        self.tokenizer = state.engine.tokenizer
        self._close_ids = list(self.tokenizer.encode(FORCED_THINK_CLOSE, add_special_tokens=False).ids)
        self._think_end_ids = list(self.tokenizer.encode(THINK_END, add_special_tokens=False).ids)

    # ---------------------------------------------------------------------------------------- prompt

    def _template(self, req: ChatCompletionRequest) -> ChatTemplate:
        if req.chat_template is None:
            return self.state.chat_template
        if not self.settings.trust_request_chat_template:
            raise bad_request(
                "A request-supplied chat_template is refused; start the server with "
                "--trust-request-chat-template to allow it.", param="chat_template",
            )
        try:
            return ChatTemplate(req.chat_template, special_tokens=self.state.chat_template.special_tokens)
        except TemplateError as e:
            raise bad_request(str(e), param="chat_template") from None

    def render(self, req: ChatCompletionRequest) -> tuple[str, list[int], dict[str, Any], int | None]:
        """Prompt text, prompt token ids, template kwargs and reasoning budget. Blocking: run in a thread."""
        kwargs, budget = template_kwargs(req)
        template = self._template(req)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        try:
            prompt = template.render(message_dicts(req), tools=tools,
                                     add_generation_prompt=req.add_generation_prompt, **kwargs)
        except TemplateError as e:
            raise bad_request(f"The messages could not be rendered: {e}", param="messages") from None
        return prompt, encode(self.tokenizer, prompt, add_special_tokens=False), kwargs, budget

    # ---------------------------------------------------------------------------------------- request

    async def create(self, request: Request, req: ChatCompletionRequest) -> Any:
        state = self.state
        check_serving(state)
        model = check_model(state, req.model)
        tool_choice = tool_choice_value(req)
        if req.tools and tool_choice is None:
            tool_choice = "auto"  # OpenAI's default when tools are given
        if req.tools and tool_choice == "auto" and not self.settings.enable_auto_tool_choice:
            raise bad_request('"auto" tool choice (the default when tools are given) requires the server to be '
                              "started with --enable-auto-tool-choice; or send tool_choice \"none\", "
                              '"required" or a named function', param="tool_choice")
        if req.tools and tool_choice != "none" and not self.settings.tool_call_parser:
            raise bad_request("tool calls need a --tool-call-parser", param="tool_choice")

        prompt, prompt_ids, kwargs, budget = await run_sync(self.render, req)
        max_tokens = resolve_max_tokens(state, len(prompt_ids), req.effective_max_tokens, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling_params(req, max_tokens, logprobs)
        thinking = bool(kwargs.get("enable_thinking", True)) and self.settings.reasoning_parser is not None
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        structured = await run_sync(structured_output, self.engine, req, tools, tool_choice,
                                    self.settings.constrain_auto_tool_choice,
                                    tuple(self._think_end_ids) if thinking else ())
        if structured is not None:
            if params.min_tokens:
                raise bad_request("min_tokens cannot be combined with structured output", param="min_tokens")
            params = dataclasses.replace(params, structured=structured)
        force_nonempty = bool(kwargs.get("force_nonempty_content", False))
        request_id = random_id("chatcmpl")
        specs = [
            ChoiceSpec(i, f"{request_id}-{i}", prompt_ids, choice_seed(params, i),
                       thinking_budget=budget if thinking else None, close_token_ids=self._close_ids)
            for i in range(req.n)
        ]
        check_num_choices(state, len(specs))

        def new_parser() -> ChatOutputParser:
            return ChatOutputParser(
                self.settings.reasoning_parser, self.settings.tool_call_parser, tools=tools,
                thinking_enabled=thinking, force_nonempty_content=force_nonempty, tool_choice=tool_choice,
                parallel_tool_calls=req.parallel_tool_calls is not False,
            )

        job = _ChatJob(self, req, model, request_id, prompt_ids, new_parser, thinking)
        stream = generate_choices(self.engine, specs)
        interval = self.settings.disconnect_poll_interval
        return await respond(request, job, stream, req.stream, interval)


class _ChoiceStream:
    """One choice's parser state while streaming."""

    def __init__(self, index: int, parser: ChatOutputParser) -> None:
        self.index = index
        self.parser = parser
        self.num_tokens = 0
        self.reasoning_tokens = 0
        self.text = ""
        self.saw_tool_call = False
        self.sent_role = False


class _ChatJob:
    def __init__(self, serving: ChatServing, req: ChatCompletionRequest, model: str, request_id: str,
                 prompt_ids: list[int], new_parser: Any, thinking: bool) -> None:
        self.serving = serving
        self.state = serving.state
        self.tokenizer = serving.tokenizer
        self.req = req
        self.model = model
        self.request_id = request_id
        self.created = now()
        self.num_prompt_tokens = len(prompt_ids)
        self.new_parser = new_parser
        self.thinking = thinking
        self.timer = RequestTimer(self.state)
        self.fingerprint = self.state.settings.system_fingerprint

    def _reasoning_tokens(self, text_before: str, delta: ChoiceDelta) -> int:
        """Tokens of `delta` that belong to the think block (up to and including `</think>`)."""
        if not self.thinking or THINK_END in text_before:
            return 0
        return len(delta.token_ids)

    # ---------------------------------------------------------------------------------------- non-streaming

    async def collect(self, stream: AsyncIterator[ChoiceDelta]) -> JSONResponse:
        accs = [ChoiceAccumulator(i) for i in range(self.req.n)]
        reasoning_tokens = 0
        cached = CachedTokens(self.req.n)
        try:
            async for delta in stream:
                cached.add(delta)
                if delta.token_ids:
                    self.timer.tokens()
                reasoning_tokens += self._reasoning_tokens(accs[delta.index].text, delta)
                accs[delta.index].add(delta)
        finally:
            await stream.aclose()
        for acc in accs:
            if acc.error:
                raise APIError(500, f"The request failed in the engine: {acc.error}", code="engine_error")
        choices = []
        for acc in accs:
            parsed = self.new_parser().parse(acc.text)
            calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                     for c in parsed.tool_calls]
            finish = acc.finish_reason
            if calls and finish in ("stop", "length"):
                finish = "tool_calls"
            choices.append(ChatChoice(
                index=acc.index,
                message=ResponseMessage(content=parsed.content, reasoning_content=parsed.reasoning, tool_calls=calls),
                logprobs=self._logprobs(acc.token_ids, acc.logprobs) if self.req.logprobs else None,
                finish_reason=finish,
                stop_reason=acc.stop_reason,
            ))
        num_generated = sum(len(a.token_ids) for a in accs)
        self.timer.finished(self.num_prompt_tokens, num_generated, choices[0].finish_reason if choices else None)
        response = ChatCompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=choices,
            usage=usage(self.num_prompt_tokens, num_generated, reasoning_tokens, cached.total),
            system_fingerprint=self.fingerprint,
        )
        return JSONResponse(response.model_dump(mode="json"))

    # ---------------------------------------------------------------------------------------- streaming

    def _chunk(self, choice: ChatStreamChoice | None, usage_now: Any = None) -> str:
        return sse(ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model,
            choices=[choice] if choice is not None else [], usage=usage_now,
            system_fingerprint=self.fingerprint,
        ))

    async def stream(self, first: ChoiceDelta | None, rest: AsyncIterator[ChoiceDelta]) -> AsyncIterator[str]:
        req = self.req
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        choices = [_ChoiceStream(i, self.new_parser()) for i in range(req.n)]
        reasoning_tokens = 0
        cached = CachedTokens(req.n)
        finish_reason: str | None = None
        try:
            for c in choices:
                c.sent_role = True
                yield self._chunk(ChatStreamChoice(index=c.index, delta=DeltaMessage(role="assistant", content="")))

            async for delta in prepend(first, rest):
                c = choices[delta.index]
                cached.add(delta)
                if delta.token_ids:
                    self.timer.tokens()
                reasoning_tokens += self._reasoning_tokens(c.text, delta)
                c.text += delta.text
                c.num_tokens += len(delta.token_ids)
                if delta.error:
                    yield sse_error(500, f"The request failed in the engine: {delta.error}", code="engine_error")
                    finish_reason = "error"
                    break
                parsed = c.parser.feed(delta.text) if delta.text else None
                if delta.finish_reason is not None:
                    tail = c.parser.finish()
                    parsed = _merge(parsed, tail) if parsed is not None else tail
                logprobs = (self._logprobs(delta.token_ids, delta.logprobs or [])
                            if req.logprobs and delta.token_ids else None)
                usage_now = (usage(self.num_prompt_tokens, sum(x.num_tokens for x in choices), reasoning_tokens,
                                   cached.total) if continuous else None)
                if parsed is not None and not parsed.is_empty() or logprobs is not None:
                    message = self._delta_message(c, parsed)
                    yield self._chunk(ChatStreamChoice(index=c.index, delta=message, logprobs=logprobs), usage_now)
                if delta.finish_reason is not None:
                    finish = delta.finish_reason
                    if c.saw_tool_call and finish in ("stop", "length"):
                        finish = "tool_calls"
                    finish_reason = finish_reason or finish
                    yield self._chunk(ChatStreamChoice(index=c.index, delta=DeltaMessage(), finish_reason=finish,
                                                       stop_reason=delta.stop_reason), usage_now)
            if include_usage:
                yield self._chunk(None, usage(self.num_prompt_tokens, sum(x.num_tokens for x in choices),
                                              reasoning_tokens, cached.total))
            yield DONE
        except Exception as e:  # one request's failure ends its own stream only
            api_error = engine_error(e)
            finish_reason = "error"
            yield sse_error(api_error.status, api_error.message, code=api_error.code)
            yield DONE
        finally:
            await rest.aclose()
            self.timer.finished(self.num_prompt_tokens, sum(x.num_tokens for x in choices), finish_reason or "abort")

    def _delta_message(self, c: _ChoiceStream, parsed: Any) -> DeltaMessage:
        if parsed is None:
            return DeltaMessage(content="")
        tool_calls = None
        if parsed.tool_calls:
            c.saw_tool_call = True
            # one entry per call index in a chunk, as OpenAI streams them: a call's name and its arguments
            # may come out of the parser in the same step (several tokens per step with MTP)
            merged: list[list[Any]] = []
            for tc in parsed.tool_calls:
                if merged and merged[-1][0] == tc.index:
                    last = merged[-1]
                    last[1], last[2] = last[1] or tc.id, last[2] or tc.name
                    if tc.arguments_fragment is not None:
                        last[3] = (last[3] or "") + tc.arguments_fragment
                else:
                    merged.append([tc.index, tc.id, tc.name, tc.arguments_fragment])
            tool_calls = [
                ToolCallDelta(
                    index=index, id=call_id, type="function" if call_id else None,
                    function=FunctionCallDelta(name=name, arguments=args if args is not None else ("" if name else None)),
                )
                for index, call_id, name, args in merged
            ]
        return DeltaMessage(content=parsed.content, reasoning_content=parsed.reasoning, tool_calls=tool_calls)

    # ---------------------------------------------------------------------------------------- logprobs

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, Any]]) -> ChoiceLogprobs:
        content = []
        top_n = self.req.top_logprobs or 0
        as_ids = self.state.settings.return_tokens_as_token_ids
        for i, tid in enumerate(token_ids):
            entry = logprobs[i] if i < len(logprobs) else {}
            chosen = entry.get(tid)
            text = token_text(self.tokenizer, tid, as_ids)
            tops = sorted(entry.items(), key=lambda kv: (kv[1].rank or 0, -kv[1].logprob))[:top_n] if top_n else []
            content.append(TokenLogprob(
                token=text,
                logprob=max(chosen.logprob, -9999.0) if chosen is not None else -9999.0,
                bytes=list(text.encode("utf-8")),
                top_logprobs=[
                    TopLogprob(token=(t := token_text(self.tokenizer, k, as_ids)), logprob=max(v.logprob, -9999.0),
                               bytes=list(t.encode("utf-8")))
                    for k, v in tops
                ],
            ))
        return ChoiceLogprobs(content=content)


def _merge(a: Any, b: Any) -> Any:
    """Join two parser deltas (the last text delta and the parser's finish())."""
    def cat(x: str | None, y: str | None) -> str | None:
        return None if x is None and y is None else (x or "") + (y or "")

    a.reasoning = cat(a.reasoning, b.reasoning)
    a.content = cat(a.content, b.content)
    a.tool_calls = list(a.tool_calls) + list(b.tool_calls)
    return a

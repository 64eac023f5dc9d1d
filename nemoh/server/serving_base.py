"""What chat and completions serving share: body parsing, model check, limits, sampling, engine errors."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from nemoh.engine.outputs import EngineDeadError, EngineError, Logprob, QueueFullError
from nemoh.sampling_params import SamplingParams
from nemoh.server.errors import APIError, bad_request, queue_full, unavailable, validation_message
from nemoh.server.generation import ChoiceDelta
from nemoh.server.protocol import PromptTokensDetails, Usage, UsageDetails
from nemoh.server.settings import ServerState
from nemoh.server.streaming import SSE_HEADERS, ClientDisconnected, first_and_rest, until_disconnected

logger = logging.getLogger("nemoh.server")

M = TypeVar("M", bound=BaseModel)
SEED_MODULUS = 2**63


async def parse_body(request: Request, model: type[M]) -> M:
    """Read and validate a JSON body; every failure is a 400 with OpenAI's error shape."""
    content_type = request.headers.get("content-type", "application/json")
    if "json" not in content_type.split(";")[0].lower():
        raise APIError(415, f"Content-Type must be application/json, got {content_type!r}")
    body = await request.body()
    if not body.strip():
        raise bad_request("The request body is empty; a JSON object is expected.")
    # Strict JSON validation: "16" is not an integer and true is not a number, as in OpenAI's API.
    # pydantic's JSON parser also bounds nesting depth and rejects invalid UTF-8, NaN and Infinity.
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as e:
        message, param = validation_message(e)
        raise bad_request(message, param=param) from None


def check_model(state: ServerState, model: str | None) -> str:
    names = state.settings.served_model_names
    if model is None or model == "":
        return names[0]
    if model not in names:
        raise APIError(404, f"The model {model!r} does not exist; this server serves {names}.",
                       param="model", code="model_not_found")
    return model


def check_serving(state: ServerState) -> None:
    if state.draining:
        raise unavailable("The server is shutting down.")
    if state.dead:
        raise unavailable("The engine has stopped.")


def check_num_choices(state: ServerState, num_choices: int) -> None:
    """A request whose choices (prompts x n) outnumber what the engine can ever hold is a 400, not a 429 that no
    retry could turn into a success."""
    capacity = getattr(state.engine, "max_num_requests", None)
    if capacity is not None and num_choices > capacity:
        raise bad_request(f"This request needs {num_choices} sequences (prompts x n) but the server holds at most "
                          f"{capacity} at once; lower n or send fewer prompts per request.", param="n")


def resolve_max_tokens(state: ServerState, num_prompt_tokens: int, max_tokens: int | None, what: str) -> int:
    """Check prompt + max_tokens against the context; returns the max_tokens to use."""
    limit = state.engine.max_model_len
    if num_prompt_tokens >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, your request has "
            f"{num_prompt_tokens} input tokens in the {what}, which leaves no room for the completion. "
            f"Please reduce the length of the {what}.",
            param=what, code="context_length_exceeded",
        )
    if max_tokens is None:
        return limit - num_prompt_tokens
    if num_prompt_tokens + max_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {what}, {max_tokens} in the "
            f"completion). Please reduce the length of the {what} or the max_tokens.",
            param="max_tokens", code="context_length_exceeded",
        )
    return max_tokens


def sampling_params(req: Any, max_tokens: int, logprobs: int | None) -> SamplingParams:
    try:
        return SamplingParams(
            n=1,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            min_p=req.min_p,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            seed=None if req.seed is None else req.seed % SEED_MODULUS,
            max_tokens=max_tokens,
            min_tokens=min(req.min_tokens, max_tokens),
            stop=list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
        )
    except ValueError as e:
        raise bad_request(str(e)) from None


def choice_seed(params: SamplingParams, index: int) -> SamplingParams:
    """The params of choice `index`: a seeded request gets seed+index, so the n choices differ."""
    if params.seed is None or index == 0:
        return params
    return replace(params, seed=(params.seed + index) % SEED_MODULUS)


def engine_error(exc: BaseException) -> APIError:
    """Map what the engine raises for one request onto the client's answer."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return queue_full()
    if isinstance(exc, EngineDeadError):
        return unavailable("The engine has stopped.")
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    if isinstance(exc, EngineError):
        logger.error("request failed in the engine: %s", exc)
        return APIError(500, f"The request failed in the engine: {exc}", code="engine_error")
    logger.error("request failed", exc_info=exc)
    return APIError(500, "Internal server error.", code="internal_error")


async def respond(request: Request, job: Any, stream: Any, streaming: bool, interval: float):
    """Answer with SSE (`job.stream(first, rest)`) or one JSON body (`job.collect(stream)`).

    A stream's 200 is committed only once the first delta exists, so queue-full or a dead engine still get
    their own status; a client that leaves gets 499 (nobody reads it) and its requests are aborted.
    """
    try:
        if streaming:
            first, rest = await first_and_rest(request, stream, interval)
            return StreamingResponse(job.stream(first, rest), media_type="text/event-stream", headers=SSE_HEADERS)
        return await until_disconnected(request, job.collect(stream), interval)
    except ClientDisconnected:
        return JSONResponse({}, status_code=499)
    except APIError:
        raise
    except Exception as e:
        raise engine_error(e) from None


async def run_sync(fn: Any, *args: Any) -> Any:
    """Run CPU work (template rendering, tokenizing long prompts) off the event loop."""
    return await anyio.to_thread.run_sync(fn, *args)


def encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("The prompt contains invalid Unicode (unpaired surrogates).") from None
    try:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
    except Exception as e:  # the Rust tokenizer raises plain Exceptions on odd input
        raise bad_request(f"The prompt could not be tokenized: {e}") from None


def token_text(tokenizer: Any, token_id: int, as_id: bool = False) -> str:
    """A logprob entry's token: its text, or "token_id:N" (--return-tokens-as-token-ids, for clients that need
    the exact token when its text does not say it, e.g. a byte of a multi-byte character)."""
    return f"token_id:{token_id}" if as_id else tokenizer.decode([token_id], skip_special_tokens=False)


@dataclass
class ChoiceAccumulator:
    """Per-choice totals, whether streamed or not."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason
        if delta.error:
            self.error = delta.error


class CachedTokens:
    """Prompt tokens served from the prefix cache, per prompt: the n choices of one prompt share it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._by_prompt: dict[int, int] = {}

    def add(self, delta: ChoiceDelta) -> None:
        prompt = delta.index // self.n
        self._by_prompt[prompt] = max(self._by_prompt.get(prompt, 0), delta.num_cached_tokens)

    @property
    def total(self) -> int:
        return sum(self._by_prompt.values())


def usage(num_prompt_tokens: int, num_completion_tokens: int, reasoning_tokens: int | None = None,
          cached_tokens: int = 0) -> Usage:
    return Usage(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=num_completion_tokens,
        total_tokens=num_prompt_tokens + num_completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        completion_tokens_details=None if reasoning_tokens is None else UsageDetails(reasoning_tokens=reasoning_tokens),
    )


class RequestTimer:
    """TTFT, inter-token latency and end-to-end latency of one request, into the server's histograms."""

    def __init__(self, state: ServerState) -> None:
        self.metrics = state.metrics
        self.start = time.perf_counter()
        self.last: float | None = None

    def tokens(self) -> None:
        t = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(t - self.start)
        else:
            self.metrics.itl.observe(t - self.last)
        self.last = t

    def finished(self, num_prompt_tokens: int, num_generated: int, finish_reason: str | None) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.start)
        self.metrics.prompt_tokens.inc(num_prompt_tokens)
        self.metrics.generation_tokens.inc(num_generated)
        self.metrics.request_finished(finish_reason)

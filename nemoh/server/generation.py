"""Drive the engine for one API request: one engine request per choice, text deltas out, aborts guaranteed.

Each of the `n` choices is its own engine request (`<id>-<index>`), so every choice can be continued on its
own when a reasoning budget runs out, and the output stream is a plain merge of independent streams.

Reasoning budget (`max_thinking_tokens`): the first engine request is capped at the budget. If it stops on
that cap and the text has no `</think>` yet, the server appends the tokens of `</think>\\n` itself (they are
streamed to the client like generated text) and continues with a second engine request whose prompt is
the original prompt + everything generated so far, for the rest of `max_tokens`. If `</think>` did come
within the budget, the continuation simply resumes generation. The cost is one extra prefill of
prompt + reasoning, paid only by requests whose output is longer than the budget.

Whatever ends the consumer (finish, error, client disconnect, task cancellation), every engine request
that has not finished is aborted: the `finally` blocks below shield the abort from cancellation.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

import anyio

from nemoh.engine.outputs import Logprob
from nemoh.sampling_params import SamplingParams

logger = logging.getLogger("nemoh.server")

THINK_END = "</think>"
FORCED_THINK_CLOSE = "</think>\n"


@dataclass
class ChoiceDelta:
    """New output of one choice since its previous delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None           # set on the choice's last delta
    stop_reason: int | str | None = None
    error: str | None = None
    num_cached_tokens: int = 0                 # prompt tokens the engine took from its prefix cache


@dataclass
class ChoiceSpec:
    """What to generate for one choice."""

    index: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    thinking_budget: int | None = None          # None: no budget (or thinking off)
    close_token_ids: list[int] = dataclasses.field(default_factory=list)   # tokens of "</think>\n"


async def abort_quietly(engine: Any, request_id: str) -> None:
    """Abort an engine request; safe to call from `finally` while the caller is being cancelled."""
    with anyio.CancelScope(shield=True):
        try:
            await engine.abort(request_id)
        except Exception:  # an already-finished or unknown request is not an error here
            logger.debug("abort of %s failed", request_id, exc_info=True)


async def generate_choice(engine: Any, spec: ChoiceSpec) -> AsyncIterator[ChoiceDelta]:
    params = spec.params
    max_tokens = params.max_tokens
    budget_pending = spec.thinking_budget is not None
    generated: list[int] = []
    prompt = list(spec.prompt_token_ids)
    phase = 0
    while True:
        remaining = max_tokens - len(generated) if max_tokens is not None else None
        sub_max = remaining
        if budget_pending:
            budget_left = spec.thinking_budget - len(generated)
            sub_max = budget_left if remaining is None else min(remaining, budget_left)
        finish_reason, stop_reason, phase_text = "length", None, ""
        if sub_max is None or sub_max > 0:
            phase_params = dataclasses.replace(
                params,
                n=1,
                max_tokens=sub_max,
                min_tokens=max(0, min(params.min_tokens - len(generated), sub_max or params.min_tokens)),
                # a continuation's grammar resumes where the reply is: after the think block, past its tokens
                structured=params.structured.continued(generated) if params.structured and phase else params.structured,
            )
            request_id = spec.request_id if phase == 0 else f"{spec.request_id}-cont{phase}"
            finished = False
            num_ids = 0
            try:
                async for out in engine.generate(
                    prompt_token_ids=prompt, sampling_params=phase_params, request_id=request_id
                ):
                    if out.error:
                        finished = True
                        yield ChoiceDelta(spec.index, "", [], finish_reason="error", error=out.error)
                        return
                    completion = out.outputs[0]
                    new_ids = list(completion.token_ids[num_ids:])
                    new_logprobs = list(completion.logprobs[num_ids:]) if completion.logprobs else None
                    num_ids = len(completion.token_ids)
                    text = completion.text
                    new_text = text[len(phase_text):] if text.startswith(phase_text) else ""
                    phase_text = text if text.startswith(phase_text) else phase_text
                    generated.extend(new_ids)
                    if completion.finish_reason is not None or out.finished:
                        finished = True
                        finish_reason = completion.finish_reason or "stop"
                        stop_reason = completion.stop_reason
                    if new_text or new_ids:
                        # a continuation after a thinking budget re-sends the output as prompt: not counted
                        yield ChoiceDelta(spec.index, new_text, new_ids, new_logprobs,
                                          num_cached_tokens=out.num_cached_tokens if phase == 0 else 0)
                    if finished:
                        break
            finally:
                if not finished:
                    await abort_quietly(engine, request_id)
            if not finished:
                # The engine's stream ended without a finish reason: treat as aborted.
                finish_reason = "abort"
        budget_hit = budget_pending and finish_reason == "length" and (
            max_tokens is None or len(generated) < max_tokens
        )
        if not budget_hit:
            yield ChoiceDelta(spec.index, "", [], finish_reason=finish_reason, stop_reason=stop_reason)
            return
        budget_pending = False
        if THINK_END not in phase_text:
            forced = spec.close_token_ids
            if max_tokens is not None:
                forced = forced[: max_tokens - len(generated)]
            generated.extend(forced)
            yield ChoiceDelta(
                spec.index,
                FORCED_THINK_CLOSE if len(forced) == len(spec.close_token_ids) else "",
                list(forced),
                [{t: Logprob(0.0, rank=1)} for t in forced] if params.logprobs is not None else None,
            )
        if max_tokens is not None and len(generated) >= max_tokens:
            yield ChoiceDelta(spec.index, "", [], finish_reason="length")
            return
        prompt = list(spec.prompt_token_ids) + generated
        phase += 1


async def generate_choices(engine: Any, specs: list[ChoiceSpec]) -> AsyncIterator[ChoiceDelta]:
    """Merge the choices' delta streams (in arrival order); closing this generator aborts them all."""
    if len(specs) == 1:
        stream = generate_choice(engine, specs[0])
        try:
            async for delta in stream:
                yield delta
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
        return

    queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()

    async def pump(spec: ChoiceSpec) -> None:
        try:
            async for delta in generate_choice(engine, spec):
                await queue.put(delta)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the consumer, which raises it
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(spec)) for spec in specs]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        with anyio.CancelScope(shield=True):
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

"""`POST /v1/completions`: raw prompts (text or token ids, one or a batch) → engine → OpenAI text completions.

With a batch of P prompts and `n` choices each, choice `index = prompt_index * n + i`, as in OpenAI's API.
Token-id prompts are checked against the vocabulary here, so an out-of-range id is a 400, not an engine
crash.
"""
from __future__ import annotations

from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from nemoh.server.errors import APIError, bad_request
from nemoh.server.generation import ChoiceDelta, ChoiceSpec, generate_choices
from nemoh.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
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
from nemoh.server.streaming import DONE, prepend, sse, sse_error


class CompletionServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.engine = state.engine
        self.tokenizer = state.engine.tokenizer
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def prompts(self, req: CompletionRequest) -> list[tuple[str, list[int]]]:
        """(text, token ids) per prompt. Blocking: run in a thread."""
        raw = req.prompt
        if isinstance(raw, str):
            items: list[Any] = [raw]
        elif raw and isinstance(raw[0], int):
            items = [raw]
        else:
            items = list(raw)
        out = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                out.append((item, encode(self.tokenizer, item, add_special_tokens=True)))
                continue
            bad = next((t for t in item if t >= self.vocab_size), None)
            if bad is not None:
                raise bad_request(f"prompt[{i}] has token id {bad}, outside the vocabulary (size {self.vocab_size})",
                                  param="prompt")
            out.append((self.tokenizer.decode(item, skip_special_tokens=False), list(item)))
        return out

    async def create(self, request: Request, req: CompletionRequest) -> Any:
        state = self.state
        check_serving(state)
        model = check_model(state, req.model)
        prompts = await run_sync(self.prompts, req)
        request_id = random_id("cmpl")
        specs = []
        for p, (_, ids) in enumerate(prompts):
            max_tokens = resolve_max_tokens(state, len(ids), req.max_tokens, "prompt")
            params = sampling_params(req, max_tokens, req.logprobs)
            for i in range(req.n):
                index = p * req.n + i
                specs.append(ChoiceSpec(index, f"{request_id}-{index}", ids, choice_seed(params, i)))
        check_num_choices(state, len(specs))
        job = _CompletionJob(self, req, model, request_id, prompts)
        stream = generate_choices(self.engine, specs)
        interval = state.settings.disconnect_poll_interval
        return await respond(request, job, stream, req.stream, interval)


class _CompletionJob:
    def __init__(self, serving: CompletionServing, req: CompletionRequest, model: str, request_id: str,
                 prompts: list[tuple[str, list[int]]]) -> None:
        self.state = serving.state
        self.tokenizer = serving.tokenizer
        self.req = req
        self.model = model
        self.request_id = request_id
        self.created = now()
        self.prompts = prompts
        self.num_prompt_tokens = sum(len(ids) for _, ids in prompts)
        self.num_choices = len(prompts) * req.n
        self.timer = RequestTimer(self.state)
        self.fingerprint = self.state.settings.system_fingerprint

    def _prompt_text(self, index: int) -> str:
        return self.prompts[index // self.req.n][0]

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, Any]], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        as_ids = self.state.settings.return_tokens_as_token_ids
        for i, tid in enumerate(token_ids):
            entry = logprobs[i] if i < len(logprobs) else {}
            text = token_text(self.tokenizer, tid, as_ids)
            chosen = entry.get(tid)
            out.tokens.append(text)
            out.token_logprobs.append(max(chosen.logprob, -9999.0) if chosen is not None else None)
            out.text_offset.append(offset)
            offset += len(text)
            tops = sorted(entry.items(), key=lambda kv: (kv[1].rank or 0, -kv[1].logprob))[: self.req.logprobs or 0]
            out.top_logprobs.append({token_text(self.tokenizer, k, as_ids): max(v.logprob, -9999.0) for k, v in tops}
                                    if self.req.logprobs else None)
        return out

    async def collect(self, stream: AsyncIterator[ChoiceDelta]) -> JSONResponse:
        accs = [ChoiceAccumulator(i) for i in range(self.num_choices)]
        cached = CachedTokens(self.req.n)
        try:
            async for delta in stream:
                cached.add(delta)
                if delta.token_ids:
                    self.timer.tokens()
                accs[delta.index].add(delta)
        finally:
            await stream.aclose()
        for acc in accs:
            if acc.error:
                raise APIError(500, f"The request failed in the engine: {acc.error}", code="engine_error")
        choices = []
        for acc in accs:
            prefix = self._prompt_text(acc.index) if self.req.echo else ""
            choices.append(CompletionChoice(
                index=acc.index, text=prefix + acc.text,
                logprobs=(self._logprobs(acc.token_ids, acc.logprobs, len(prefix))
                          if self.req.logprobs is not None else None),
                finish_reason=acc.finish_reason, stop_reason=acc.stop_reason,
            ))
        num_generated = sum(len(a.token_ids) for a in accs)
        self.timer.finished(self.num_prompt_tokens, num_generated, choices[0].finish_reason)
        response = CompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=choices,
            usage=usage(self.num_prompt_tokens, num_generated, cached_tokens=cached.total),
            system_fingerprint=self.fingerprint,
        )
        return JSONResponse(response.model_dump(mode="json"))

    def _chunk(self, choice: CompletionChoice | None, usage_now: Any = None) -> str:
        return sse(CompletionResponse(
            id=self.request_id, created=self.created, model=self.model,
            choices=[choice] if choice is not None else [], usage=usage_now, system_fingerprint=self.fingerprint,
        ))

    async def stream(self, first: ChoiceDelta | None, rest: AsyncIterator[ChoiceDelta]) -> AsyncIterator[str]:
        req = self.req
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        num_tokens = [0] * self.num_choices
        offsets = [0] * self.num_choices
        finish_reason: str | None = None
        cached = CachedTokens(req.n)
        try:
            if req.echo:
                for i in range(self.num_choices):
                    text = self._prompt_text(i)
                    offsets[i] = len(text)
                    yield self._chunk(CompletionChoice(index=i, text=text))

            async for delta in prepend(first, rest):
                i = delta.index
                cached.add(delta)
                if delta.error:
                    yield sse_error(500, f"The request failed in the engine: {delta.error}", code="engine_error")
                    finish_reason = "error"
                    break
                if delta.token_ids:
                    self.timer.tokens()
                num_tokens[i] += len(delta.token_ids)
                logprobs = (self._logprobs(delta.token_ids, delta.logprobs or [], offsets[i])
                            if req.logprobs is not None and delta.token_ids else None)
                offsets[i] += len(delta.text)
                usage_now = (usage(self.num_prompt_tokens, sum(num_tokens), cached_tokens=cached.total)
                             if continuous else None)
                if delta.text or logprobs is not None or delta.finish_reason is not None:
                    if delta.finish_reason is not None:
                        finish_reason = finish_reason or delta.finish_reason
                    yield self._chunk(CompletionChoice(index=i, text=delta.text, logprobs=logprobs,
                                                       finish_reason=delta.finish_reason,
                                                       stop_reason=delta.stop_reason), usage_now)
            if include_usage:
                yield self._chunk(None, usage(self.num_prompt_tokens, sum(num_tokens), cached_tokens=cached.total))
            yield DONE
        except Exception as e:
            api_error = engine_error(e)
            finish_reason = "error"
            yield sse_error(api_error.status, api_error.message, code=api_error.code)
            yield DONE
        finally:
            await rest.aclose()
            self.timer.finished(self.num_prompt_tokens, sum(num_tokens), finish_reason or "abort")

"""A scripted engine for parser-level server tests: it "generates" a fixed text, tokenized with the real tokenizer.

It speaks the AsyncLLMEngine interface the server uses (generate / abort / stats / is_healthy / tokenizer /
max_model_len) and keeps counters so tests can see aborts. The continuation request of a reasoning budget
is served from the same script: the prompt's generated tail is matched against the script and generation
resumes after it.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from nemoh.engine.outputs import CompletionOutput, QueueFullError, RequestOutput
from nemoh.sampling_params import SamplingParams

EOS_IDS = (2, 11)


class ScriptedEngine:
    def __init__(self, tokenizer, max_model_len: int = 2048, delay: float = 0.0,
                 script: Callable[[list[int]], str] | str = "Hello!", max_running: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.delay = delay
        self.script = script
        self.max_running = max_running
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.abort_calls: list[str] = []
        self.requests: list[tuple[list[int], SamplingParams]] = []
        self.healthy = True

    def grammar_compiler(self):
        """A real compiler, so that constrained requests are checked and accepted; the script ignores the grammar
        (these tests are about the parsers)."""
        from nemoh.engine.grammar_compiler import GrammarCompiler

        if getattr(self, "_compiler", None) is None:
            self._compiler = GrammarCompiler.from_tokenizer(self.tokenizer, 4096, [2, 11])
        return self._compiler

    def _script_ids(self, prompt_ids: list[int]) -> list[int]:
        text = self.script(prompt_ids) if callable(self.script) else self.script
        return self.tokenizer.encode(text, add_special_tokens=False).ids + [11]

    async def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        if self.max_running is not None and len(self.running) >= self.max_running:
            raise QueueFullError("queue full")
        self.requests.append((list(prompt_token_ids), sampling_params))
        script = self._script_ids(prompt_token_ids)
        # A continuation: the prompt already holds part of the script; resume after it.
        start = 0
        for k in range(min(len(script), len(prompt_token_ids)), 0, -1):
            if prompt_token_ids[-k:] == script[:k]:
                start = k
                break
        script = script[start:]
        self.running.add(request_id)
        ids: list[int] = []
        try:
            for tid in script:
                if self.delay:
                    await asyncio.sleep(self.delay)
                else:
                    await asyncio.sleep(0)
                if request_id not in self.running:
                    return
                finish = None
                if tid in EOS_IDS and not sampling_params.ignore_eos:
                    finish = "stop"
                else:
                    ids.append(tid)
                    if sampling_params.max_tokens is not None and len(ids) >= sampling_params.max_tokens:
                        finish = "length"
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                yield RequestOutput(request_id, prompt, list(prompt_token_ids),
                                    [CompletionOutput(0, text, list(ids), finish_reason=finish)],
                                    finished=finish is not None)
                if finish:
                    return
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.abort_calls.append(request_id)
        if request_id in self.running:
            self.aborted.append(request_id)
            self.running.discard(request_id)

    def is_healthy(self) -> bool:
        return self.healthy

    def stats(self) -> dict:
        return {"num_running": len(self.running), "num_waiting": 0, "kv_cache_usage": 0.0}

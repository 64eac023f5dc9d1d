"""The offline API, shaped like vLLM's: `LLM(model_dir, **engine_args).generate(prompts, sampling_params)`."""
from __future__ import annotations

import itertools
import os
from typing import Sequence as Seq

from nemoh.engine.llm_engine import LLMEngine
from nemoh.engine.outputs import RequestOutput
from nemoh.sampling_params import SamplingParams

PromptType = str | list[int] | dict


class LLM:
    """Batch generation over a NemotronH checkpoint directory.

    `engine_args` are `nemoh.engine.EngineArgs` fields (max_num_seqs, max_num_batched_tokens, max_model_len,
    kv_cache_dtype, mamba_ssm_cache_dtype, cache_memory_gb, speculative_config, enable_prefix_caching, dtype,
    device, seed, ...).
    """

    def __init__(self, model: str | os.PathLike, **engine_args):
        self.model_dir = os.fspath(model)
        self.engine = LLMEngine.from_pretrained(self.model_dir, **engine_args)
        self._ids = itertools.count()
        self._chat_template = None

    def get_tokenizer(self):
        return self.engine.tokenizer

    # ---- generation -------------------------------------------------------------------------------------
    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, {"prompt": str} / {"prompt_token_ids": [...]}, or a list of
        these. Returns one finished RequestOutput per prompt, in order."""
        items = self._normalise_prompts(prompts)
        params = self._normalise_params(sampling_params, len(items))
        return self._run([(text, ids, p) for (text, ids), p in zip(items, params)])

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Render each conversation with the checkpoint's chat template and generate its reply."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        template = self._template()
        texts = [template.render(conv, tools=tools, add_generation_prompt=True, **(chat_template_kwargs or {}))
                 for conv in conversations]
        params = self._normalise_params(sampling_params, len(texts))
        return self._run([(t, self.engine.encode(t, add_special_tokens=False), p) for t, p in zip(texts, params)])

    def _template(self):
        if self._chat_template is None:
            from nemoh.chat.template import ChatTemplate

            self._chat_template = ChatTemplate.from_model_dir(self.engine.args.tokenizer or self.model_dir)
        return self._chat_template

    def _run(self, items: list[tuple[str | None, list[int], SamplingParams]]) -> list[RequestOutput]:
        engine = self.engine
        for _, ids, p in items:                 # reject a bad batch before anything is queued
            engine.validate_prompt(ids, p)
        order = []
        for text, ids, p in items:
            request_id = f"offline-{next(self._ids)}"
            engine.add_request(request_id, prompt=text, prompt_token_ids=ids, params=p)
            order.append(request_id)
        finished: dict[str, RequestOutput] = {}
        try:
            while len(finished) < len(order):
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
        finally:
            for request_id in order:
                if request_id not in finished:
                    engine.abort_request(request_id)
        return [finished[r] for r in order]

    def _normalise_prompts(self, prompts) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        out = []
        for p in prompts:
            if isinstance(p, dict):
                if "prompt_token_ids" in p:
                    out.append((p.get("prompt"), list(p["prompt_token_ids"])))
                elif "prompt" in p:
                    out.append((p["prompt"], self.engine.encode(p["prompt"])))
                else:
                    raise ValueError("prompts: a dict prompt needs 'prompt' or 'prompt_token_ids'")
            elif isinstance(p, str):
                out.append((p, self.engine.encode(p)))
            elif isinstance(p, (list, tuple)):
                out.append((None, list(p)))
            else:
                raise ValueError(f"prompts: unsupported prompt type {type(p).__name__}")
        return out

    @staticmethod
    def _normalise_params(params, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"sampling_params: {len(params)} given for {n} prompts")
        return params

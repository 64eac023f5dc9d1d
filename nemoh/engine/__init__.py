"""The nemoh engine: scheduler, caches, model runner, sampler, MTP speculative decoding, sync and async fronts."""
from nemoh.engine.config import EngineArgs, SpeculativeConfig
from nemoh.engine.outputs import (CompletionOutput, EngineDeadError, EngineError, Logprob, QueueFullError,
                                  RequestOutput)

__all__ = ["AsyncLLMEngine", "CompletionOutput", "EngineArgs", "EngineDeadError", "EngineError", "LLMEngine",
           "Logprob", "QueueFullError", "RequestOutput", "SpeculativeConfig"]


def __getattr__(name):
    # The engines import torch and the model code; load them only when asked for.
    if name == "LLMEngine":
        from nemoh.engine.llm_engine import LLMEngine

        return LLMEngine
    if name == "AsyncLLMEngine":
        from nemoh.engine.async_engine import AsyncLLMEngine

        return AsyncLLMEngine
    raise AttributeError(name)

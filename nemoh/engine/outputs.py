"""What the engine hands back for a request: plain dataclasses, no tensors."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None          # 1 = most likely
    decoded_token: str | None = None


# One entry per generated token: {token_id: Logprob} holding the chosen token and the top-n alternatives.
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int
    text: str                                   # cumulative detokenized text (stop strings removed)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None            # None while running; "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None        # the stop string or stop token id that ended it
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    error: str | None = None                    # set when the request failed inside the engine


class EngineError(RuntimeError):
    """A request could not be served; the engine itself is still healthy."""


class QueueFullError(EngineError):
    """The bounded waiting queue is full; the caller should retry later (HTTP 429/503)."""


class EngineDeadError(RuntimeError):
    """The engine loop hit a fatal error and stopped; /health must report it."""

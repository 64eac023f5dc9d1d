"""Per-request sampling settings, vLLM-shaped so that users already know the names."""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class StructuredOutput:
    """A grammar the output must follow (constrained decoding), from nemoh/chat/grammar.py.

    The constraint starts once the output has produced `start_after` (the tokens of ``</think>``: reasoning stays
    free), or at once when it is empty. `prefix_token_ids` are constrained tokens generated before this request
    (a continuation of the same reply, see server/generation.py): the grammar consumes them first.
    """
    grammar: str
    param: str = "response_format"          # the request field it came from, for error messages
    start_after: tuple[int, ...] = ()
    prefix_token_ids: tuple[int, ...] = ()

    def continued(self, generated: list[int]) -> "StructuredOutput":
        """The constraint of a request that continues after `generated` (tokens this constraint produced)."""
        if not self.start_after:
            return replace(self, prefix_token_ids=self.prefix_token_ids + tuple(generated))
        n = len(self.start_after)
        for i in range(len(generated) - n, -1, -1):
            if tuple(generated[i:i + n]) == self.start_after:
                return replace(self, start_after=(), prefix_token_ids=tuple(generated[i + n:]))
        return self


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0          # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16       # None: up to the model's context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None       # number of top logprobs per generated token (0: only the chosen one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"SamplingParams.{name}: {why} (got {getattr(self, name)!r})")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if self.n > 128:
            bad("n", "must be <= 128")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", "must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be 0 or -1 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(name, "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            bad("repetition_penalty", "must be in (0, 10]")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", "must be an integer in [0, 20]")
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int) or not 0 <= self.prompt_logprobs <= 20
        ):
            bad("prompt_logprobs", "must be an integer in [0, 20]")
        if self.structured is not None and self.min_tokens:
            bad("min_tokens", "cannot be combined with structured output (the grammar decides where the output ends)")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

"""Reasoning parsers: split generated text into ``reasoning_content`` and ``content``.

``super_v3`` (Nemotron 3, REFERENCE §5). With thinking on, the prompt ends with ``<think>\\n``, so
generation starts inside the think block:

1. a leading ``<think>`` the model repeats anyway is dropped, with one newline after it;
2. text up to the first ``</think>`` is reasoning, the rest is content; one newline right before
   and one right after ``</think>`` are dropped, so that the parts render back to exactly what the
   nemotron3 template writes (``<think>\\nREASONING\\n</think>\\nCONTENT``). vLLM keeps them;
3. no ``</think>`` at all (the token budget ran out): everything is reasoning, content is None;
4. ``force_nonempty_content``: when content would be empty, the reasoning text is *also* returned
   as content. vLLM moves it (reasoning becomes None), but a stream has already sent the reasoning
   deltas by the time it knows there will be no content, so here ``finish()`` sends the reasoning
   text again as one content delta, and ``parse()`` returns both fields to match the stream;
5. thinking off: everything is content.

Streaming (``feed``/``finish``) yields exactly what ``parse`` returns on the concatenated text, for
any split of the text into deltas: text that may be the start of ``</think>`` is held back until
the next delta decides it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"


@dataclass
class ReasoningResult:
    reasoning: str | None
    content: str | None


@dataclass
class ReasoningDelta:
    reasoning: str | None = None
    content: str | None = None


REASONING_PARSERS: dict[str, type] = {}


def register_reasoning_parser(name: str) -> Callable[[type], type]:
    def register(cls: type) -> type:
        REASONING_PARSERS[name] = cls
        return cls

    return register


def get_reasoning_parser(name: str) -> type:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {sorted(REASONING_PARSERS)}") from None


def partial_suffix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


# Phases of the streaming state machine.
_START, _REASONING, _CONTENT = "start", "reasoning", "content"


@register_reasoning_parser("super_v3")
class SuperV3ReasoningParser:
    def __init__(self, thinking_enabled: bool = True, force_nonempty_content: bool = False) -> None:
        self.thinking_enabled = thinking_enabled
        self.force_nonempty_content = force_nonempty_content
        self._phase = _START if thinking_enabled else _CONTENT
        self._pending = ""  # text not yet assigned to a side
        self._strip_newline = False  # drop one "\n" at the start of content (right after </think>)
        self._reasoning_parts: list[str] = []
        self._has_content = False

    @property
    def in_reasoning(self) -> bool:
        """True until ``</think>`` has been seen (always False with thinking off)."""
        return self._phase != _CONTENT

    def parse(self, text: str) -> ReasoningResult:
        """Non-streaming split of a whole generation."""
        if not self.thinking_enabled:
            return ReasoningResult(None, text or None)
        if text.startswith(THINK_START):
            text = _drop_newline(text[len(THINK_START):])
        reasoning, end, content = text.partition(THINK_END)
        if end:
            if reasoning.endswith("\n"):
                reasoning = reasoning[:-1]
            content = _drop_newline(content)
        if self.force_nonempty_content and not content and reasoning:
            content = reasoning
        return ReasoningResult(reasoning or None, content or None)

    def feed(self, delta: str) -> ReasoningDelta:
        """Consume one text delta; returns what can be attributed so far."""
        if self._phase == _CONTENT:
            return self._content_delta(delta)
        self._pending += delta
        if self._phase == _START:
            if len(self._pending) <= len(THINK_START) and THINK_START.startswith(self._pending):
                return ReasoningDelta()  # may still be a repeated "<think>" (+ its newline)
            if self._pending.startswith(THINK_START):
                self._pending = _drop_newline(self._pending[len(THINK_START):])
            self._phase = _REASONING
        return self._scan_reasoning()

    def finish(self) -> ReasoningDelta:
        """End of generation: flush held-back text and apply ``force_nonempty_content``."""
        out = ReasoningDelta()
        if self._phase != _CONTENT:
            if self._phase == _START and self._pending == THINK_START:
                self._pending = ""
            if self._pending:
                out.reasoning = self._pending
                self._reasoning_parts.append(self._pending)
                self._pending = ""
            self._phase = _CONTENT
        if self.force_nonempty_content and not self._has_content and self._reasoning_parts:
            out.content = "".join(self._reasoning_parts)
            self._has_content = True
        return out

    def _scan_reasoning(self) -> ReasoningDelta:
        out = ReasoningDelta()
        reasoning, end, rest = self._pending.partition(THINK_END)
        if end:
            if reasoning.endswith("\n"):
                reasoning = reasoning[:-1]
            self._pending = ""
            self._phase = _CONTENT
            self._strip_newline = True
            out.content = self._content_delta(rest).content
        else:
            # Hold back a tail that may become "\n</think>" with the next delta.
            hold = max(partial_suffix_len(reasoning, "\n" + THINK_END), partial_suffix_len(reasoning, THINK_END))
            cut = len(reasoning) - hold
            reasoning, self._pending = reasoning[:cut], reasoning[cut:]
        if reasoning:
            out.reasoning = reasoning
            self._reasoning_parts.append(reasoning)
        return out

    def _content_delta(self, text: str) -> ReasoningDelta:
        if self._strip_newline and text:
            text = _drop_newline(text)
            self._strip_newline = False
        if not text:
            return ReasoningDelta()
        self._has_content = True
        return ReasoningDelta(content=text)


def _drop_newline(text: str) -> str:
    return text[1:] if text.startswith("\n") else text

"""Streaming-safe incremental detokenization and stop-string matching.

As in vLLM: decode a small window `ids[prefix_offset:]` and compare it with the already-emitted window
`ids[prefix_offset:read_offset]`; the difference is the new text. The window keeps a few tokens of left
context so that tokenizers whose pieces depend on their neighbours (leading-space markers) decode right.
A window whose text ends in U+FFFD is an incomplete UTF-8 sequence (a multi-byte character split across
byte-level tokens): nothing is emitted until the next token completes it.

Stop strings are searched in the cumulative text across token boundaries; the text from the stop string on
is cut (unless `include_stop_str_in_output`). While a request runs, the last `len(longest stop) - 1`
characters are held back from the visible text so that a stream never shows the start of a stop string.
"""
from __future__ import annotations

from typing import Protocol

INITIAL_OFFSET = 5   # prompt tokens of left context for the first window (vLLM's value)
REPLACEMENT_CHAR = "\ufffd"


class TokenDecoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: TokenDecoder, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self.include_stop_str_in_output = include_stop_str_in_output
        self._ids: list[int] = list(prompt_token_ids[-INITIAL_OFFSET:])
        self.prefix_offset = 0
        self.read_offset = len(self._ids)
        self.text = ""                         # cumulative output text (cut at a stop string)
        self.stopped = False
        longest = max((len(s) for s in self.stop), default=0)
        self._hold_back = 0 if include_stop_str_in_output else max(longest - 1, 0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str | None:
        """Append one generated token; returns the stop string if the text now contains one."""
        if self.stopped:
            return None
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self._ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return None
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self._ids)
        return self._append_text(delta)

    def flush(self) -> None:
        """At the end of a request: emit whatever is still held back (an unfinished character decodes to U+FFFD)."""
        if self.stopped or self.read_offset == len(self._ids):
            return
        prefix_text = self._decode(self._ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self._ids[self.prefix_offset:])
        self.prefix_offset, self.read_offset = self.read_offset, len(self._ids)
        if len(new_text) > len(prefix_text):
            self._append_text(new_text[len(prefix_text):])

    def _append_text(self, delta: str) -> str | None:
        start = max(0, len(self.text) - self._longest_stop() + 1)
        self.text += delta
        hits = [(idx, s) for s in self.stop if (idx := self.text.find(s, start)) != -1]
        if not hits:
            return None
        idx, s = min(hits)
        self.text = self.text[: idx + len(s)] if self.include_stop_str_in_output else self.text[:idx]
        self.stopped = True
        return s

    def _longest_stop(self) -> int:
        return max((len(s) for s in self.stop), default=1)

    def visible_text(self, finished: bool) -> str:
        """The text a caller may see now: all of it once finished, else without a possible stop-string start."""
        if finished or not self._hold_back:
            return self.text
        return self.text[: max(0, len(self.text) - self._hold_back)]

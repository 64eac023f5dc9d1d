"""Compiling grammars with llguidance: the tokenizer bridge, limits on size and time, and a cache by grammar.

Why llguidance rather than xgrammar (`python benchmarks/grammar_backends.py` on this 2-core machine, xgrammar
0.2.9 from a side directory): llguidance compiles a JSON schema in about 1 ms at the demo's vocabulary (4k) and at
Super's size (131k), where xgrammar takes 2-4 ms and 140-205 ms (it precomputes per-state token caches, which
matters when every request brings its own tool list); its masks cost 16-24 us a token at 4k and 21-46 us at 131k,
against xgrammar's 2-6 us and 4-107 us: both far below a decode step. llguidance is a 7.6 MB wheel with no
dependencies; xgrammar requires torch, transformers, triton and a TVM runtime (16 MB for itself and tvm_ffi). And
llguidance speaks Lark with inline JSON schemas and special tokens, which the qwen3_coder tool-call format needs
(XML around raw-text and JSON values), and rolls a matcher back by n tokens (speculative decoding).

A compiled grammar is an `LLMatcher` in its start state; every sequence gets a `deep_copy` of it. Compiling is
bounded three ways, so that no request can stall the engine: the grammar text's size, llguidance's own parser
limits (grammar symbols, lexer states and fuel), and a wall-clock limit; each failure is a `GrammarError` (a
400 naming the request field at fault). The cache is keyed by the grammar text and bounded (LRU).
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import OrderedDict

import llguidance

from nemoh.chat.grammar import GrammarError, json_string

logger = logging.getLogger(__name__)

MAX_GRAMMAR_CHARS = 4 * 1024 * 1024
COMPILE_TIMEOUT_S = 2.0
CACHE_SIZE = 256
LIMITS = dict(max_grammar_size=500_000, max_lexer_states=100_000, initial_lexer_fuel=2_000_000)


class GrammarCompiler:
    """Grammar text -> a matcher in its start state, for one tokenizer and vocabulary. Thread-safe."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int],
                 timeout_s: float = COMPILE_TIMEOUT_S, cache_size: int = CACHE_SIZE) -> None:
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.timeout_s = timeout_s
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # one worker: compiles run one at a time, and a compile past its time limit finishes in the background
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nemoh-grammar")
        self.num_compiled = 0

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int, eos_token_ids: list[int], **kwargs) -> "GrammarCompiler":
        """From a `tokenizers.Tokenizer` (the engine's)."""
        return cls(tokenizer.to_str(), vocab_size, eos_token_ids, **kwargs)

    def marker(self, text: str) -> str:
        """Lark for a tag: the special token when the tokenizer has it as one (``<[6]>``), else the text."""
        ids = self.tokenizer.tokenize_str(text)
        if len(ids) == 1 and self.tokenizer.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return json_string(text)

    def matcher(self, grammar: str, param: str) -> llguidance.LLMatcher:
        """A fresh matcher for a grammar (compiled once, then copied from the cache); `param` names the request field
        it came from. Raises GrammarError."""
        with self._lock:
            template = self._cache.get(grammar)
            if template is not None:
                self._cache.move_to_end(grammar)
        if template is None:
            template = self._compile(grammar, param)
            with self._lock:
                self._cache[grammar] = template
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return template.deep_copy()

    def _compile(self, grammar: str, param: str) -> llguidance.LLMatcher:
        if len(grammar) > MAX_GRAMMAR_CHARS:
            raise GrammarError(f"the grammar is too large ({len(grammar)} characters)", param)
        try:
            matcher = self._pool.submit(self._build, grammar).result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise GrammarError(f"the grammar took longer than {self.timeout_s:g} s to compile", param) \
                from None
        if matcher.is_error():
            raise GrammarError(f"the grammar library cannot use this schema: {_reason(matcher.get_error())}",
                               param)
        self.num_compiled += 1
        return matcher

    def _build(self, grammar: str) -> llguidance.LLMatcher:
        limits = llguidance.LLParserLimits(**LIMITS, verbose_errors=False)
        return llguidance.LLMatcher(self.tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0,
                                    limits=limits)

    @property
    def num_cached(self) -> int:
        return len(self._cache)


def _reason(error: str) -> str:
    """A library error on one line, without its parser-state dump."""
    text = " ".join(line.strip() for line in error.split("<state>")[0].splitlines() if line.strip())
    return text[:500] or "unknown error"


"""llguidance vs xgrammar on this machine: grammar compile time and token-mask time per token, at the demo's
vocabulary (its real tokenizer, 4,096 rows) and at Super's size (131,072 tokens: a synthetic byte-level
vocabulary of the same size, since Super's tokenizer is not on this machine), on the same JSON schemas.

    python benchmarks/grammar_backends.py            # xgrammar is optional: PYTHONPATH=<its site dir> to include it

Each side builds its tokenizer once (not timed), compiles each schema (timed, cold: a fresh compiler per schema),
then walks a valid JSON text token by token computing the mask before each token (timed) and accepting it.
Medians over the tokens and rounds; warm-up excluded.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

DEMO_TOKENIZER = Path(__file__).resolve().parent.parent / "nemoh" / "demo" / "model" / "tokenizer.json"
SCHEMAS = {
    "flat": ({"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
              "required": ["city"]}, {"city": "Paris and its suburbs", "days": 3}),
    "nested": ({"type": "object", "properties": {
        "user": {"type": "object", "properties": {"name": {"type": "string"}, "tags": {
            "type": "array", "items": {"enum": ["admin", "dev", "ops"]}, "maxItems": 3}},
                 "required": ["name", "tags"]},
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "ünïcode": {"type": "boolean"}}, "required": ["user", "score"]},
        {"user": {"name": "Ada Lovelace", "tags": ["admin", "ops"]}, "score": 0.75, "ünïcode": True}),
}


def synthetic_vocab(size: int, seed: int = 0) -> list[bytes]:
    """256 bytes, then words and fragments (with and without a leading space) up to `size` distinct tokens."""
    rng = random.Random(seed)
    vocab = [bytes([b]) for b in range(256)]
    seen = set(vocab)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_\"{}[]:,.-"
    while len(vocab) < size:
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 9)))
        for token in (word.encode(), b" " + word.encode()):
            if token not in seen and len(vocab) < size:
                seen.add(token)
                vocab.append(token)
    return vocab


class LLGuidanceSide:
    name = "llguidance"

    def __init__(self, vocab: list[bytes] | None):
        import llguidance
        import llguidance.torch as lt

        self.llg, self.lt = llguidance, lt
        if vocab is None:
            self.tokenizer = llguidance.LLTokenizer(DEMO_TOKENIZER.read_text(), n_vocab=4096, eos_token=2)
        else:
            self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapper(vocab)))
        self.vocab_size = self.tokenizer.vocab_size

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.tokenize_str(text)

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={
            "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        return self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)

    def walk(self, matcher, ids: list[int]) -> list[float]:
        mask = self.lt.allocate_token_bitmask(1, self.vocab_size)
        times = []
        for t in ids:
            start = time.perf_counter()
            self.lt.fill_next_token_bitmask(matcher, mask)
            times.append(time.perf_counter() - start)
            assert matcher.consume_token(t), matcher.get_error()
        return times


class _Wrapper:
    """What llguidance's TokenizerWrapper reads from a tokenizer: the token bytes and a (greedy) encoder."""

    def __init__(self, vocab: list[bytes]):
        self.tokens = vocab
        self.eos_token_id = 0
        self.bos_token_id = None
        self.special_token_ids = []
        self._index = {t: i for i, t in enumerate(vocab)}
        self._longest = max(len(t) for t in vocab)

    def __call__(self, text) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode()
        out, i = [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                if data[i:i + n] in self._index:
                    out.append(self._index[data[i:i + n]])
                    i += n
                    break
        return out


class XGrammarSide:
    name = "xgrammar"

    def __init__(self, vocab: list[bytes] | None):
        import xgrammar

        self.xgr = xgrammar
        if vocab is None:
            from transformers import PreTrainedTokenizerFast

            hf = PreTrainedTokenizerFast(tokenizer_file=str(DEMO_TOKENIZER))
            self.info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=4096)
            self.vocab_size = 4096
            return
        self.info = xgrammar.TokenizerInfo(list(vocab), vocab_type=xgrammar.VocabType.RAW, vocab_size=len(vocab),
                                           stop_token_ids=[0])
        self.vocab_size = len(vocab)

    def compile(self, schema: dict):
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
        return self.xgr.GrammarMatcher(compiled)

    def walk(self, matcher, ids: list[int]) -> list[float]:
        mask = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        times = []
        for t in ids:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - start)
            assert matcher.accept_token(t)
        return times


def measure(side, ids_for, rounds: int) -> dict[str, tuple[float, float]]:
    """{schema: (compile ms, mask µs per token)} (medians)."""
    out = {}
    for key, (schema, _) in SCHEMAS.items():
        ids = ids_for[key]
        side.walk(side.compile(schema), ids)            # warm-up
        compiles, masks = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            matcher = side.compile(schema)
            compiles.append(time.perf_counter() - start)
            masks += side.walk(matcher, ids)
        out[key] = (1e3 * statistics.median(compiles), 1e6 * statistics.median(masks))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sides = [LLGuidanceSide]
    try:
        import xgrammar  # noqa: F401  (optional competitor)
        sides.append(XGrammarSide)
    except ImportError:
        print("xgrammar not importable: llguidance only")
    rows = []
    for label, vocab in (("demo 4k", None), ("131k synthetic", synthetic_vocab(131072))):
        reference = LLGuidanceSide(vocab)            # one tokenization of the texts for both sides
        ids_for = {k: reference.tokenize(json.dumps(v, ensure_ascii=False)) for k, (_, v) in SCHEMAS.items()}
        for cls in sides:
            side = reference if cls is LLGuidanceSide else cls(vocab)
            for key, (compile_ms, mask_us) in measure(side, ids_for, args.rounds).items():
                rows.append((label, side.name, key, compile_ms, mask_us))
    print(f"{'vocabulary':<16} {'library':<11} {'schema':<7} {'compile ms':>10} {'mask µs/token':>14}")
    for label, name, key, compile_ms, mask_us in rows:
        print(f"{label:<16} {name:<11} {key:<7} {compile_ms:>10.2f} {mask_us:>14.1f}")


if __name__ == "__main__":
    main()

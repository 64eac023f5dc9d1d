"""Incremental detokenization: equals a full decode, never emits broken UTF-8, cuts stop strings across tokens."""
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from nemoh.engine.detokenizer import IncrementalDetokenizer

TOKENIZER = Path(__file__).resolve().parents[2] / "nemoh" / "demo" / "model" / "tokenizer.json"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(TOKENIZER))


def stream(tok, text, **kw):
    prompt = tok.encode("Hello there.", add_special_tokens=False).ids
    ids = tok.encode(text, add_special_tokens=False).ids
    d = IncrementalDetokenizer(tok, prompt, **kw)
    seen = []
    stop = None
    for t in ids:
        stop = d.add_token(t)
        seen.append(d.visible_text(finished=False))
        if stop:
            break
    d.flush()
    return d, seen, stop, ids


def test_incremental_equals_full_decode_and_utf8_safe(tok):
    text = "Grüße, 世界! naïve café 🙂 done"
    d, seen, _, ids = stream(tok, text)
    assert d.text == tok.decode(ids) == text
    for partial in seen:
        assert "\ufffd" not in partial
        assert text.startswith(partial)
    # multi-byte characters really were split across tokens (else the test proves nothing)
    assert any(tok.decode([t]).endswith("\ufffd") for t in ids)


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("hi", add_special_tokens=False).ids + [11] + tok.encode(" x", add_special_tokens=False).ids
    for skip, expected in ((True, "hi x"), (False, "hi<|im_end|> x")):
        d = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
        for t in ids:
            d.add_token(t)
        assert d.text == expected


def test_stop_string_across_tokens_is_cut_and_never_streamed(tok):
    text = "The answer is STOPWORD and more"
    d, seen, stop, ids = stream(tok, text, stop=["STOPWORD"])
    assert stop == "STOPWORD" and d.stopped
    assert d.text == "The answer is "
    for partial in seen:
        assert "STOP" not in partial            # held back while the stop string could still be forming
    # the stop string did span several tokens
    assert len(tok.encode("STOPWORD", add_special_tokens=False).ids) > 1
    d2, _, stop2, _ = stream(tok, text, stop=["STOPWORD"], include_stop_str_in_output=True)
    assert d2.text == "The answer is STOPWORD"
    d3, _, stop3, _ = stream(tok, text, stop=["more", "answer"])
    assert stop3 == "answer" and d3.text == "The "

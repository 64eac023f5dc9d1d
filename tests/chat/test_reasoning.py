"""super_v3 reasoning parser: scripted outputs, and streaming equal to non-streaming for every split."""

import pytest

from nemoh.chat.reasoning import (
    REASONING_PARSERS,
    ReasoningResult,
    SuperV3ReasoningParser,
    get_reasoning_parser,
    partial_suffix_len,
)

CASES = [
    # (text, thinking, force, expected reasoning, expected content)
    ("Let me think.\n</think>\nThe answer is 42.", True, False, "Let me think.", "The answer is 42."),
    ("r</think>c", True, False, "r", "c"),
    ("r\n\n</think>\n\nc\n", True, False, "r\n", "\nc\n"),
    ("<think>\nr\n</think>\nc", True, False, "r", "c"),
    ("<think>r</think>c", True, False, "r", "c"),
    ("</think>only content", True, False, None, "only content"),
    ("ran out of budget 😀 </thi", True, False, "ran out of budget 😀 </thi", None),
    ("ran out of budget", True, True, "ran out of budget", "ran out of budget"),
    ("r\n</think>\n", True, True, "r", "r"),
    ("r\n</think>\n", True, False, "r", None),
    ("r</think>c", True, True, "r", "c"),
    ("", True, False, None, None),
    ("", True, True, None, None),
    ("<think>", True, False, None, None),
    ("<thin", True, False, "<thin", None),
    ("x<think>y</think>z</think>w", True, False, "x<think>y", "z</think>w"),
    ("no thinking </think> here", False, False, None, "no thinking </think> here"),
    ("no thinking", False, True, None, "no thinking"),
    ("ünïcødé 🤔\n</think>\n答え 😀", True, False, "ünïcødé 🤔", "答え 😀"),
]


@pytest.mark.parametrize("text,thinking,force,reasoning,content", CASES)
def test_parse(text, thinking, force, reasoning, content):
    parser = SuperV3ReasoningParser(thinking_enabled=thinking, force_nonempty_content=force)
    assert parser.parse(text) == ReasoningResult(reasoning, content)


def _stream(pieces, thinking, force):
    parser = SuperV3ReasoningParser(thinking_enabled=thinking, force_nonempty_content=force)
    reasoning, content = [], []
    for delta in [parser.feed(p) for p in pieces] + [parser.finish()]:
        for sink, value in ((reasoning, delta.reasoning), (content, delta.content)):
            if value is not None:
                assert value != ""  # no empty deltas
                sink.append(value)
    return ReasoningResult("".join(reasoning) or None, "".join(content) or None)


@pytest.mark.parametrize("text,thinking,force,reasoning,content", CASES)
def test_streaming_matches_parse_at_every_split(text, thinking, force, reasoning, content):
    expected = ReasoningResult(reasoning, content)
    for i in range(len(text) + 1):
        assert _stream([text[:i], text[i:]], thinking, force) == expected, i
    assert _stream(list(text), thinking, force) == expected
    for i in range(len(text) + 1):  # three pieces with an empty one
        assert _stream([text[:i], "", text[i:]], thinking, force) == expected, i


def test_partial_end_tag_never_leaks_into_reasoning():
    parser = SuperV3ReasoningParser()
    assert parser.feed("abc</thi").reasoning == "abc"
    d = parser.feed("nk>\nanswer")
    assert d.reasoning is None and d.content == "answer"
    assert not parser.in_reasoning


def test_reasoning_streams_before_the_end():
    parser = SuperV3ReasoningParser()
    assert parser.feed("step one, ").reasoning == "step one, "
    assert parser.feed("step two\n").reasoning == "step two"  # the newline may precede </think>
    assert parser.feed("more").reasoning == "\nmore"


def test_force_nonempty_content_arrives_at_finish():
    parser = SuperV3ReasoningParser(force_nonempty_content=True)
    assert parser.feed("budget ran out").reasoning == "budget ran out"
    final = parser.finish()
    assert final.content == "budget ran out" and final.reasoning is None


def test_registry():
    assert REASONING_PARSERS["super_v3"] is SuperV3ReasoningParser
    assert get_reasoning_parser("super_v3") is SuperV3ReasoningParser
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        get_reasoning_parser("nope")


def test_partial_suffix_len():
    assert partial_suffix_len("abc</th", "</think>") == 4
    assert partial_suffix_len("abc</think>", "</think>") == 0  # a whole tag is not partial
    assert partial_suffix_len("abc<", "</think>") == 1
    assert partial_suffix_len("", "</think>") == 0

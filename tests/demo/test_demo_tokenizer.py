import json

import pytest
from tokenizers import Tokenizer

from nemoh.demo import build_tokenizer as bt
from nemoh.demo import corpus

MODEL_DIR = bt.MODEL_DIR
EXPECTED_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<think>": 4, "</think>": 5, "<tool_call>": 6,
                "</tool_call>": 7, "<tool_response>": 8, "</tool_response>": 9, "<|im_start|>": 10,
                "<|im_end|>": 11}
SAMPLES = ["plain ascii text", "emoji 😀🔥 and CJK 中文字符 and accents éàü", "tabs\tand\nnewlines\r\n  spaces",
           "U12345 INC-4821 anna.berg@contoso.com", ""]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))


def test_special_token_ids(tok):
    for content, i in EXPECTED_IDS.items():
        assert tok.token_to_id(content) == i
    assert bt.SPECIAL_TOKEN_IDS == EXPECTED_IDS
    assert bt.EOS_TOKEN_IDS == [2, 11]
    assert tok.get_vocab_size() <= bt.DEFAULT_VOCAB_SIZE  # BPE stops early when no pair repeats


def test_special_tokens_are_single_ids(tok):
    for content, i in EXPECTED_IDS.items():
        assert tok.encode(f"a{content}b", add_special_tokens=False).ids.count(i) == 1


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_level_round_trip(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_skip_special_keeps_model_markers(tok):
    text = "<|im_start|>assistant\n<think>\nok</think>\n<tool_call>\n<function=x>\n</function>\n</tool_call><|im_end|>"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids, skip_special_tokens=True) == (
        "assistant\n<think>\nok</think>\n<tool_call>\n<function=x>\n</function>\n</tool_call>")


def test_digits_are_single_tokens(tok):
    pieces = tok.encode("U12345", add_special_tokens=False).tokens
    assert pieces[-5:] == list("12345")


def test_rendered_corpus_round_trips(tok):
    template = corpus.load_template()
    for e in corpus.generate("heldout", 20, 3):
        text = corpus.render(e, template)
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert ids.count(EXPECTED_IDS["<|im_start|>"]) == text.count("<|im_start|>")
        assert 0 not in ids  # byte-level: nothing is unknown


def test_config_files():
    config = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<s>" and config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<pad>" and config["unk_token"] == "<unk>"
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["tool_parser_type"] == "qwen3_coder"
    assert config["model_max_length"] > 0
    decoder = config["added_tokens_decoder"]
    assert {int(k): v["content"] for k, v in decoder.items()} == {i: c for c, i in EXPECTED_IDS.items()}
    non_special = {"<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"}
    assert {v["content"] for v in decoder.values() if not v["special"]} == non_special
    template = (MODEL_DIR / "chat_template.jinja").read_text()
    assert config["chat_template"] == template
    assert template == bt.TEMPLATE_SOURCE.read_text()
    special_map = json.loads((MODEL_DIR / "special_tokens_map.json").read_text())
    assert special_map["eos_token"] == "<|im_end|>"


def test_build_tokenizer_keeps_ids(tmp_path):
    texts = [corpus.render(e) for e in corpus.generate("train", 30, 5)]
    tok = bt.build_tokenizer(texts, 600, tmp_path, chat_template="{{ messages }}")
    assert [tok.token_to_id(c) for c in EXPECTED_IDS] == list(range(12))
    assert (tmp_path / "chat_template.jinja").read_text() == "{{ messages }}"
    with pytest.raises(ValueError, match="vocab_size"):
        bt.train_tokenizer(texts, 100)


def test_transformers_loads_offline(monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for hf in (transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR)),
               transformers.PreTrainedTokenizerFast(tokenizer_file=str(MODEL_DIR / "tokenizer.json"))):
        text = "<|im_start|>user\nhi 😀<|im_end|>\n<|im_start|>assistant\n<think>\n"
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json")).encode(text, add_special_tokens=False).ids
        assert hf.decode(ids) == text
        assert hf.decode(ids, skip_special_tokens=True) == "user\nhi 😀\nassistant\n<think>\n"
    auto = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))
    assert auto.eos_token_id == 11 and auto.pad_token_id == 3 and auto.bos_token_id == 1
    messages = [{"role": "user", "content": "hi"}]
    assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        corpus.render_messages(messages, None, {}, add_generation_prompt=True)


def test_email_is_one_token_a_character_in_sentence_and_call(tok):
    """An address is the same ids wherever it stands, so the model can copy it id by id."""
    address = "ana.lopez@example.com"
    in_sentence = tok.encode(f"Hi, this is {address}. I forgot my password", add_special_tokens=False).ids
    in_call = tok.encode(f"<parameter=email>\n{address}\n</parameter>", add_special_tokens=False).ids
    alone = tok.encode(address, add_special_tokens=False).ids
    assert len(alone) == len(address)
    assert any(in_sentence[i:i + len(alone)] == alone for i in range(len(in_sentence)))
    assert any(in_call[i:i + len(alone)] == alone for i in range(len(in_call)))


def test_markup_runs_merge_but_words_do_not(tok):
    """The chat format's tag runs may merge into few tokens; words are never merged across a space."""
    tags = "</name>\n<description>"
    assert len(tok.encode(tags, add_special_tokens=False).ids) < len(tags) // 4
    for piece in (tok.id_to_token(i) for i in tok.encode("the Wi-Fi on the 4th floor keeps dropping",
                                                           add_special_tokens=False).ids):
        assert "Ġ" not in piece[1:], piece

"""Train the demo model's byte-level BPE tokenizer and write it as a Hugging Face tokenizer directory.

The special tokens keep fixed ids 0-11 whatever the corpus, so a retrained vocabulary never moves them:
eos is [2, 11] as in Nemotron 3 Super. As in Nemotron's own tokenizer, the markers the model emits as
part of its answer (`<think>`, `</think>`, `<tool_call>`, ...) are added tokens with `special: false`:
they stay single ids, but `decode(..., skip_special_tokens=True)` keeps them, so the reasoning and tool
parsers still see them. Only the control tokens (`<s>`, `</s>`, `<pad>`, `<unk>`, ChatML brackets) are
special and skippable.

Regenerate the files from the corpus with `python -m nemoh.demo.build_tokenizer`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# (content, special) in id order: the position in this list is the token id.
SPECIAL_TOKENS: list[tuple[str, bool]] = [
    ("<unk>", True),
    ("<s>", True),
    ("</s>", True),
    ("<pad>", True),
    ("<think>", False),
    ("</think>", False),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
]
SPECIAL_TOKEN_IDS: dict[str, int] = {content: i for i, (content, _) in enumerate(SPECIAL_TOKENS)}
EOS_TOKEN_IDS = [SPECIAL_TOKEN_IDS["</s>"], SPECIAL_TOKEN_IDS["<|im_end|>"]]

DEFAULT_VOCAB_SIZE = 4096
DEFAULT_MODEL_MAX_LENGTH = 4096
MODEL_DIR = Path(__file__).parent / "model"
TEMPLATE_SOURCE = Path(__file__).parent.parent / "chat" / "templates" / "nemotron3.jinja"


# An e-mail address one character a token (the local part found by a look-ahead to the "@", the domain by
# continuing with \G from the previous piece): the address is then the same ids in the user's sentence and in
# the call, where merged pieces ("ana.l" + "opez") differ with what surrounds them and a tiny model cannot
# copy names it has never seen merged that way.
EMAIL_CHARS = r"[\w.\-+](?=[\w.\-+]*@)|@|\G(?<=[\w.\-+@])[\w.\-+]"
# A run of the chat format's markup tags with the newlines between them ("</name>\n<description>",
# "<function=lookup_user>\n<parameter=email>\n") is one pre-token, so that BPE can merge the tool schemas that
# every prompt repeats: a training example is then about 40% fewer tokens (871 -> 534 on average), and the
# trainer sees that many more conversations a minute. Everything else is split as GPT-2 splits words.
MARKUP_RUN = r"(?:\n?</?[A-Za-z_]+(?:=[A-Za-z_]+)?>)+\n?"
WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Digits one by one: ids such as U12345 / INC-4821 are copied from the user message, and a tiny model
    # copies a fixed digit alphabet far more reliably than arbitrary multi-digit merges.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(EMAIL_CHARS), behavior="isolated"),
        pre_tokenizers.Split(Regex(f"{MARKUP_RUN}|{WORDS}"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train byte-level BPE on `texts`; ids 0-11 are the special tokens, the rest is learned."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size: {vocab_size} leaves no room for the 256 byte tokens")
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[content for content, _ in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    # The trainer registers every added token as special; mark the model-emitted markers non-special.
    spec = json.loads(tokenizer.to_str())
    for entry in spec["added_tokens"]:
        content = entry["content"]
        if SPECIAL_TOKEN_IDS.get(content) != entry["id"]:
            raise ValueError(f"special token {content!r} got id {entry['id']}, expected {SPECIAL_TOKEN_IDS.get(content)}")
        entry["special"] = SPECIAL_TOKENS[entry["id"]][1]
        entry["normalized"] = False
    return Tokenizer.from_str(json.dumps(spec))


def read_chat_template() -> str:
    """The Nemotron 3 chat template shipped by nemoh.chat, or the copy already in the model directory."""
    for path in (TEMPLATE_SOURCE, MODEL_DIR / "chat_template.jinja"):
        if path.exists():
            return path.read_text()
    raise FileNotFoundError(f"no chat template at {TEMPLATE_SOURCE} or {MODEL_DIR / 'chat_template.jinja'}")


def tokenizer_config(chat_template: str, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": {
            str(i): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": special}
            for i, (content, special) in enumerate(SPECIAL_TOKENS)
        },
        "tool_parser_type": "qwen3_coder",
        "chat_template": chat_template,
    }


def write_tokenizer_files(tokenizer: Tokenizer, out_dir: str | Path, chat_template: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(chat_template), indent=2) + "\n")
    special_map = {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(chat_template)
    return out


def build_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                    out_dir: str | Path = MODEL_DIR, chat_template: str | None = None) -> Tokenizer:
    """Train on `texts` and write tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    chat_template.jinja into `out_dir`."""
    tokenizer = train_tokenizer(texts, vocab_size)
    write_tokenizer_files(tokenizer, out_dir, chat_template if chat_template is not None else read_chat_template())
    return tokenizer


def sync_chat_template(out_dir: str | Path = MODEL_DIR) -> None:
    """Re-copy nemoh/chat/templates/nemotron3.jinja into an existing tokenizer directory."""
    out = Path(out_dir)
    template = TEMPLATE_SOURCE.read_text()
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(template)


def corpus_texts(n: int, seed: int) -> list[str]:
    """Rendered train-split conversations. The held-out split stays out on purpose: merges learned only
    from held-out names would be token ids the model never trains on."""
    from nemoh.demo import corpus

    template = corpus.load_template(read_chat_template())
    return [corpus.render(ex, template) for ex in corpus.generate("train", n, seed)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12000, help="training conversations to sample")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--out", default=str(MODEL_DIR))
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer(corpus_texts(args.n, args.seed), args.vocab_size, args.out)
    print(f"wrote {args.out} (vocab {tokenizer.get_vocab_size()})")


if __name__ == "__main__":
    main()

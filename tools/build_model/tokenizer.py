"""The version's `tokenizer.json`: a checkpoint's own, or built from a WordPiece `vocab.txt` like BertTokenizer.

The server reads ids with `encode(text, add_special_tokens=False)` and assembles `[CLS] query [SEP] title
[SEP]` itself (model_format.features), so what must match the checkpoint is the normalizer (lower-casing,
accents, Chinese characters), the pre-tokenizer and the WordPiece vocabulary: `tests/test_tokenizer_parity.py`
holds the ids equal to `transformers`' tokenizer for the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def read_vocab(path: Path) -> dict[str, int]:
    """Token -> id; for a token listed twice the later id wins, as in transformers' load_vocab."""
    vocab: dict[str, int] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").split("\n")):
        token = line.rstrip("\r")
        if token or i == 0:
            vocab[token] = i
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise SystemExit(f"{path} lacks special tokens {missing}")
    return vocab


def build_tokenizer(vocab_path: Path, *, lowercase: bool = True, strip_accents: bool | None = None,
                    chinese_chars: bool = True) -> Tokenizer:
    """BertTokenizer's rules; `strip_accents` None follows `lowercase`, as BertTokenizer's does."""
    vocab = read_vocab(vocab_path)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=chinese_chars, strip_accents=strip_accents, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    for t in SPECIAL_TOKENS:
        tok.add_special_tokens([t])
    return tok


def checkpoint_tokenizer(ckpt: Path) -> tuple[Tokenizer, str]:
    """The checkpoint's tokenizer and where it came from: its `tokenizer.json` when present (taken as it is,
    after checking the special tokens the server needs), else its `vocab.txt` with the settings of its
    `tokenizer_config.json` (`do_lower_case`, `strip_accents`, `tokenize_chinese_chars`; BertTokenizer's
    defaults where absent)."""
    own = ckpt / "tokenizer.json"
    if own.is_file():
        tok = Tokenizer.from_file(str(own))
        missing = [t for t in ("[CLS]", "[SEP]", "[UNK]") if tok.token_to_id(t) is None]
        if missing:
            raise SystemExit(f"{own}: lacks the special tokens {missing} the server assembles inputs with")
        return tok, "tokenizer.json"
    config: dict[str, Any] = {}
    config_path = ckpt / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
    lowercase = bool(config.get("do_lower_case", True))
    strip = config.get("strip_accents")
    chinese = bool(config.get("tokenize_chinese_chars", True))
    tok = build_tokenizer(ckpt / "vocab.txt", lowercase=lowercase, strip_accents=None if strip is None else bool(strip),
                          chinese_chars=chinese)
    return tok, (f"vocab.txt (do_lower_case={lowercase}, strip_accents={strip}, tokenize_chinese_chars={chinese}"
                 f"{', from tokenizer_config.json' if config else ', BertTokenizer defaults'})")

"""WordPiece `vocab.txt` -> Hugging Face `tokenizers` file, configured like BertTokenizer (uncased)."""

from __future__ import annotations

from pathlib import Path

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


def build_tokenizer(vocab_path: Path, *, lowercase: bool = True) -> Tokenizer:
    vocab = read_vocab(vocab_path)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
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

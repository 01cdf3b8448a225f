"""Tiny but real model versions (same graph builder, same files, real vocabulary) for fast tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from server.manifest import EncoderShape, Head
from tools.build_model import demo_vocab
from tools.build_model.tokenizer import build_tokenizer
from tools.build_model.weights import ModelWeights, random_encoder, random_heads, random_lookups
from tools.build_model.writer import LookupVocabs, write_version

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = REPO_ROOT / "vocab" / "ernie-3.0-zh-vocab.txt"
TINY_SHAPE = EncoderShape(type="ernie", vocab_size=39980, hidden_size=32, num_layers=1, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
                          layer_norm_eps=1e-5)
TINY_LOOKUP_DIMS = (8, 4, 4)
TINY_HEAD_HIDDEN = 8


def build_small_model(root: Path, *, model: str = "tiny", version: int = 1, num_heads: int = 4,
                      srcids: Sequence[int] | None = None, seed: int = 0,
                      precisions: Sequence[str] = ("fp32",), max_seq_len: int = 48) -> Path:
    """Writes `<root>/<model>/<version>` by staging and atomic rename, as the real tools do.

    `seed` changes the weights (bottom and heads), so two versions score differently."""
    ids = list(srcids) if srcids is not None else [1000 + i for i in range(num_heads)]
    vocabs = LookupVocabs(sites=demo_vocab.demo_sites(80, 1), ner_tags=demo_vocab.NER_TAGS,
                          industries=demo_vocab.INDUSTRIES)
    feature_dim = TINY_SHAPE.hidden_size + sum(TINY_LOOKUP_DIMS)
    weights = ModelWeights(
        encoder=random_encoder(TINY_SHAPE, seed, std=0.1),
        lookups=random_lookups(vocabs.sizes, TINY_LOOKUP_DIMS, seed + 1),
        heads=random_heads(len(ids), feature_dim, TINY_HEAD_HIDDEN, seed + 2),
    )
    return write_version(
        weights, [Head(s, f"head_{s}", 0.5) for s in ids], build_tokenizer(VOCAB), vocabs,
        root=root, model_name=model, version=version, max_seq_len=max_seq_len, max_ner_tags=4,
        precisions=list(precisions),
    )

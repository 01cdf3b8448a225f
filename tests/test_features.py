"""Request fields -> model inputs (model_format.features): `[CLS] query [SEP] title [SEP]` with the
title cut first, memoized tokenization, look-up ids (missing, unknown, normalized), and padding a
batch. Tiny models only.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from model_format.features import (
    MEMO_MAX_CHARS,
    MISSING_ID,
    UNKNOWN_ID,
    EncodedRequest,
    FeatureEncoder,
    FeatureError,
    pad_batch,
)
from tests.helpers import small_vocab_entries
from tools.build_model.graph import INPUT_NAMES


def cjk_tokens(n: int, start: int = 0) -> str:
    """`n` distinct single-character CJK tokens of the small vocabulary: exactly one token each."""
    chars = [t for t in small_vocab_entries() if re.fullmatch(r"[\u4e00-\u9fff]", t)]
    assert len(chars) >= start + n
    return "".join(chars[start:start + n])


# --- request text -> ids ------------------------------------------------------------------------

def test_query_alone_is_cls_query_sep(tiny_features: FeatureEncoder) -> None:
    q = cjk_tokens(6)
    q_ids = tiny_features.tokenizer.encode(q, add_special_tokens=False).ids
    unk = tiny_features.tokenizer.token_to_id("[UNK]")
    assert len(q_ids) == 6 and unk not in q_ids
    cls, sep = tiny_features.cls_id, tiny_features.sep_id
    for title in (None, ""):
        enc = tiny_features.encode(q, title)
        assert enc.input_ids == (cls, *q_ids, sep)
        assert enc.token_type_ids == (0,) * 8
    # A missing title is simply left out: the same ids as the tokenizer's single-sequence template.
    assert list(tiny_features.encode(q).input_ids) == tiny_features.tokenizer.encode(q).ids


def test_memoized_token_ids_equal_a_fresh_tokenization(tiny_features: FeatureEncoder) -> None:
    """Repeated texts are tokenized once per version; the ids are the tokenizer's, whatever the length
    (short texts come from the memo, long ones are tokenized every time, both cut at max_seq_len)."""
    max_len = tiny_features.max_seq_len
    texts = [cjk_tokens(3), cjk_tokens(9, start=40), cjk_tokens(max_len + 20, start=7),
             "x" * (MEMO_MAX_CHARS + 1), "Hello 北京 2024"]
    before = tiny_features._memo.cache_info()
    for _ in range(2):
        for text in texts:
            fresh = tuple(tiny_features.tokenizer.encode(text, add_special_tokens=False).ids[:max_len])
            assert tiny_features.token_ids(text) == fresh, text[:20]
    after = tiny_features._memo.cache_info()
    memoized = sum(len(t) <= MEMO_MAX_CHARS for t in texts)
    assert after.misses - before.misses <= memoized and after.hits - before.hits >= memoized
    # A query over the sequence length still keeps its first max_seq_len - 2 tokens.
    long_query = cjk_tokens(max_len + 20, start=7)
    enc = tiny_features.encode(long_query, cjk_tokens(4))
    assert enc.input_ids[1:-1] == tiny_features.token_ids(long_query)[: max_len - 2] and enc.length == max_len


def test_query_and_title(tiny_features: FeatureEncoder) -> None:
    q, t = cjk_tokens(5), cjk_tokens(7, start=100)
    tok = tiny_features.tokenizer
    q_ids, t_ids = tok.encode(q, add_special_tokens=False).ids, tok.encode(t, add_special_tokens=False).ids
    enc = tiny_features.encode(q, t)
    cls, sep = tiny_features.cls_id, tiny_features.sep_id
    assert enc.input_ids == (cls, *q_ids, sep, *t_ids, sep)
    assert enc.token_type_ids == (0,) * 7 + (1,) * 8
    pair = tok.encode(q, t)  # BERT's pair template: the same ids and token types
    assert list(enc.input_ids) == pair.ids and list(enc.token_type_ids) == pair.type_ids


def test_truncation_cuts_the_title_first(tiny_features: FeatureEncoder) -> None:
    max_len = tiny_features.max_seq_len
    assert max_len == 32
    tok = tiny_features.tokenizer
    q, t = cjk_tokens(5), cjk_tokens(100, start=100)
    q_ids, t_ids = tok.encode(q, add_special_tokens=False).ids, tok.encode(t, add_special_tokens=False).ids
    cls, sep = tiny_features.cls_id, tiny_features.sep_id

    enc = tiny_features.encode(q, t)
    assert enc.length == max_len
    assert enc.input_ids == (cls, *q_ids, sep, *t_ids[:max_len - 3 - 5], sep)
    assert enc.token_type_ids == (0,) * 7 + (1,) * (max_len - 7)

    # Room for exactly one title token.
    q_long = cjk_tokens(max_len - 4)
    enc = tiny_features.encode(q_long, t)
    assert enc.length == max_len and enc.input_ids[-3:] == (sep, t_ids[0], sep)

    # No room for any title token: the title and its [SEP] are left out entirely.
    q_full = cjk_tokens(max_len - 3)
    enc = tiny_features.encode(q_full, t)
    assert enc.length == max_len - 1 and enc.token_type_ids == (0,) * (max_len - 1)
    assert enc.input_ids.count(sep) == 1

    # A query longer than max_seq_len is cut to max_seq_len - 2 tokens; no title token survives.
    q_huge = cjk_tokens(max_len + 10)
    q_huge_ids = tok.encode(q_huge, add_special_tokens=False).ids
    for title in (None, t):
        enc = tiny_features.encode(q_huge, title)
        assert enc.input_ids == (cls, *q_huge_ids[:max_len - 2], sep)
        assert enc.token_type_ids == (0,) * max_len


def test_lookup_ids(tiny_features: FeatureEncoder, tiny: Path) -> None:
    sites = (tiny / tiny_features.manifest.site.vocab_file).read_text(encoding="utf-8").split("\n")
    baidu = sites.index("baidu.com")
    assert baidu > UNKNOWN_ID
    q = "北京"
    assert tiny_features.encode(q, site="baidu.com").site_id == baidu
    assert tiny_features.encode(q, site="  BAIDU.com ").site_id == baidu  # case and outer space ignored
    assert tiny_features.encode(q, site="never-seen.example").site_id == UNKNOWN_ID
    for missing in (None, "", "   "):
        assert tiny_features.encode(q, site=missing).site_id == MISSING_ID
        assert tiny_features.encode(q, industry=missing).industry_id == MISSING_ID
    industries = (tiny / tiny_features.manifest.industry.vocab_file).read_text(encoding="utf-8").split("\n")
    assert tiny_features.encode(q, industry="旅游").industry_id == industries.index("旅游")
    assert tiny_features.encode(q, industry="未知行业").industry_id == UNKNOWN_ID

    tags = (tiny / tiny_features.manifest.ner.vocab_file).read_text(encoding="utf-8").split("\n")
    enc = tiny_features.encode(q, ner=["LOC", "NOT_A_TAG", "", " per "])
    assert enc.ner_ids == (tags.index("LOC"), UNKNOWN_ID, tags.index("PER"))  # empty tags are dropped
    many = tiny_features.encode(q, ner=["LOC", "PER", "ORG", "GPE", "TIME", "DATE"])
    assert len(many.ner_ids) == tiny_features.max_ner_tags == 4
    assert tiny_features.encode(q).ner_ids == ()


def test_query_without_tokens_is_refused(tiny_features: FeatureEncoder) -> None:
    with pytest.raises(FeatureError):
        tiny_features.encode("   ", "标题")


def test_pad_batch(tiny_features: FeatureEncoder) -> None:
    a = EncodedRequest((1, 5, 2), (0, 0, 0), 0, (), 0)
    b = EncodedRequest((1, 5, 6, 2, 7, 2), (0, 0, 0, 0, 1, 1), 3, (4, 5), 2)
    batch = pad_batch([a, b])
    assert set(batch) == set(INPUT_NAMES)
    assert all(v.dtype == np.int64 for v in batch.values())
    np.testing.assert_array_equal(batch["input_ids"], [[1, 5, 2, 0, 0, 0], [1, 5, 6, 2, 7, 2]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 0, 0, 0], [1] * 6])
    np.testing.assert_array_equal(batch["token_type_ids"], [[0] * 6, [0, 0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(batch["ner_ids"], [[0, 0], [4, 5]])
    np.testing.assert_array_equal(batch["site_id"], [0, 3])
    assert pad_batch([a])["ner_ids"].shape == (1, 1)  # at least one NER column

"""Request text -> the ids the graph reads: tokenization and site/NER/industry look-ups.

One implementation for serving and for training tools, so both see exactly the same ids.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from model_format.manifest import TOKENIZER_FILE, Manifest, read_lookup_vocab

MISSING_ID = 0  # zero vector in the graph
UNKNOWN_ID = 1  # the vocabulary's [UNK] row: a learned "some site we have not seen" embedding
# Search traffic repeats its queries and titles, and tokenizing them is the largest share of the
# event loop's own Python work on a cache hit (py-spy). Short texts (queries and most titles) are
# memoized per model version and go with it; entries and text length are both capped, so the memo
# holds at most MEMO_ENTRIES texts of MEMO_MAX_CHARS characters and their (at most max_seq_len) ids.
MEMO_ENTRIES = 8192
MEMO_MAX_CHARS = 64


class FeatureError(ValueError):
    """The request cannot be turned into model input (for example a query with no tokens)."""


@dataclass(frozen=True, slots=True)
class EncodedRequest:
    """Model input for one request, before padding."""

    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...]
    site_id: int
    ner_ids: tuple[int, ...]
    industry_id: int

    @property
    def length(self) -> int:
        return len(self.input_ids)


def _lookup_table(path: Path) -> dict[str, int]:
    return {entry: i for i, entry in enumerate(read_lookup_vocab(path)) if i > UNKNOWN_ID}


def normalize_key(value: str) -> str:
    """Site, NER and industry strings are matched case-insensitively, ignoring outer whitespace."""
    return value.strip().lower()


class FeatureEncoder:
    def __init__(self, version_dir: Path, manifest: Manifest) -> None:
        self.manifest = manifest
        self.max_seq_len = manifest.max_seq_len
        self.max_ner_tags = manifest.max_ner_tags
        self.tokenizer = Tokenizer.from_file(str(version_dir / TOKENIZER_FILE))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.cls_id = self._special("[CLS]")
        self.sep_id = self._special("[SEP]")
        self._memo = functools.lru_cache(maxsize=MEMO_ENTRIES)(self._tokenize)
        self.sites = {normalize_key(k): v for k, v in _lookup_table(version_dir / manifest.site.vocab_file).items()}
        self.ner_tags = {normalize_key(k): v for k, v in _lookup_table(version_dir / manifest.ner.vocab_file).items()}
        self.industries = {
            normalize_key(k): v for k, v in _lookup_table(version_dir / manifest.industry.vocab_file).items()
        }

    def _tokenize(self, text: str) -> tuple[int, ...]:
        # Never more than a sequence holds: assemble() cuts there anyway.
        return tuple(self.tokenizer.encode(text, add_special_tokens=False).ids[: self.max_seq_len])

    def token_ids(self, text: str) -> tuple[int, ...]:
        """Token ids of `text` without special tokens (memoized for short texts)."""
        return self._memo(text) if len(text) <= MEMO_MAX_CHARS else self._tokenize(text)

    def _special(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise FeatureError(f"tokenizer has no {token} token")
        return tid

    @staticmethod
    def _lookup(table: dict[str, int], value: str | None) -> int:
        if not value:
            return MISSING_ID
        key = normalize_key(value)
        if not key:
            return MISSING_ID
        return table.get(key, UNKNOWN_ID)

    def assemble(self, query_ids: Sequence[int], title_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """`[CLS] query [SEP] title [SEP]`; truncation keeps the query and cuts the title first."""
        query_ids = list(query_ids[: self.max_seq_len - 2])
        room = self.max_seq_len - 3 - len(query_ids)
        title_ids = list(title_ids[: max(room, 0)])
        ids = [self.cls_id, *query_ids, self.sep_id]
        types = [0] * len(ids)
        if title_ids:
            ids += [*title_ids, self.sep_id]
            types += [1] * (len(title_ids) + 1)
        return ids, types

    def encode(
        self,
        query: str,
        title: str | None = None,
        site: str | None = None,
        ner: Sequence[str] = (),
        industry: str | None = None,
    ) -> EncodedRequest:
        # Two plain `encode` calls: `encode_batch` hands two strings to a thread pool, which costs
        # more than it saves on one pair (BENCHMARKS.md, "Figures behind decisions in code").
        q_ids = self.token_ids(query)
        t_ids = self.token_ids(title) if title else ()
        if not q_ids:
            raise FeatureError("query has no tokens after normalization")
        ids, types = self.assemble(q_ids, t_ids)
        ner_ids = [self._lookup(self.ner_tags, t) for t in ner]
        return EncodedRequest(
            input_ids=tuple(ids),
            token_type_ids=tuple(types),
            site_id=self._lookup(self.sites, site),
            ner_ids=tuple(i for i in ner_ids if i != MISSING_ID)[: self.max_ner_tags],
            industry_id=self._lookup(self.industries, industry),
        )


def pad_batch(items: Sequence[EncodedRequest]) -> dict[str, np.ndarray]:
    """Right-pads a batch to its longest sequence and longest NER list (at least 1 column)."""
    b = len(items)
    seq = max(it.length for it in items)
    k = max(1, max(len(it.ner_ids) for it in items))
    input_ids = np.zeros((b, seq), np.int64)
    token_type_ids = np.zeros((b, seq), np.int64)
    attention_mask = np.zeros((b, seq), np.int64)
    ner_ids = np.zeros((b, k), np.int64)
    for row, it in enumerate(items):
        n = it.length
        input_ids[row, :n] = it.input_ids
        token_type_ids[row, :n] = it.token_type_ids
        attention_mask[row, :n] = 1
        ner_ids[row, : len(it.ner_ids)] = it.ner_ids
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "site_id": np.fromiter((it.site_id for it in items), np.int64, b),
        "ner_ids": ner_ids,
        "industry_id": np.fromiter((it.industry_id for it in items), np.int64, b),
    }

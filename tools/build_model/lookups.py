"""Trained look-up tables from files: site, NER tag and industry vocabularies with their embedding matrices.

The format (`--lookups DIR`), one pair of files per table:

    DIR/site_vocab.txt      one entry per line, line number = row: line 0 `[PAD]` (missing), line 1 `[UNK]`
    DIR/site.npy            float32 (or float16/float64) [rows, dim]: row i embeds line i; row 0 exact zeros
    DIR/ner_vocab.txt       DIR/ner.npy
    DIR/industry_vocab.txt  DIR/industry.npy

The vocabulary files are the repository's own format (`model_format.manifest.read_lookup_vocab`), so a
published version's vocabularies can be read back as they are. Entries are matched case-insensitively,
ignoring outer whitespace (`model_format.features.normalize_key`): two entries equal under that rule are
refused, as is a row count that differs from the vocabulary's, a row 0 that is not exactly zero (a missing
value must embed to zeros), and a non-finite value. Every error names the file.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from model_format.features import normalize_key
from model_format.manifest import ManifestError, read_lookup_vocab
from tools.build_model.weights import LookupTables
from tools.build_model.writer import INDUSTRY_VOCAB, NER_VOCAB, SITE_VOCAB, LookupVocabs

TABLES = (("site", SITE_VOCAB), ("ner", NER_VOCAB), ("industry", INDUSTRY_VOCAB))


class LookupTableError(ValueError):
    """A look-up vocabulary or table that cannot be served; the message names the file."""


def read_table(directory: Path, name: str, vocab_file: str) -> tuple[list[str], np.ndarray]:
    """The entries (reserved lines dropped) and the [rows, dim] float32 matrix of one table."""
    vocab_path, table_path = directory / vocab_file, directory / f"{name}.npy"
    for path in (vocab_path, table_path):
        if not path.is_file():
            raise LookupTableError(f"{path}: missing (a look-up table is a {vocab_file} and a {name}.npy)")
    try:
        entries = read_lookup_vocab(vocab_path)
    except ManifestError as exc:
        raise LookupTableError(f"{vocab_path}: {exc}") from exc
    keys = Counter(normalize_key(e) for e in entries[2:])
    clashes = sorted(k for k, n in keys.items() if n > 1 or not k)
    if clashes:
        raise LookupTableError(f"{vocab_path}: entries must be unique and non-blank (case and outer spaces ignored): "
                           f"{clashes[:5]}")
    try:
        table = np.load(table_path, allow_pickle=False)
    except ValueError as exc:
        raise LookupTableError(f"{table_path}: not a plain .npy array ({exc})") from exc
    if table.ndim != 2 or table.dtype.kind != "f":
        raise LookupTableError(f"{table_path}: expected a 2-D float matrix, got {table.dtype} {table.shape}")
    if table.shape[0] != len(entries):
        raise LookupTableError(f"{table_path}: {table.shape[0]} rows for the {len(entries)} lines of {vocab_file}")
    table = np.ascontiguousarray(table, dtype=np.float32)
    if not np.isfinite(table).all():
        raise LookupTableError(f"{table_path}: holds NaN or infinite values")
    if np.any(table[0] != 0.0):
        raise LookupTableError(f"{table_path}: row 0 ([PAD], a missing value) must be exact zeros")
    return entries[2:], table


def lookups_from_dir(directory: Path) -> tuple[LookupVocabs, LookupTables]:
    read = {name: read_table(directory, name, vocab_file) for name, vocab_file in TABLES}
    vocabs = LookupVocabs(sites=read["site"][0], ner_tags=read["ner"][0], industries=read["industry"][0])
    return vocabs, LookupTables(site=read["site"][1], ner=read["ner"][1], industry=read["industry"][1])


def write_lookups(directory: Path, vocabs: LookupVocabs, tables: LookupTables) -> None:
    """The inverse of `lookups_from_dir` (for tests and for exporting a version's tables)."""
    directory.mkdir(parents=True, exist_ok=True)
    for (name, vocab_file), entries, table in zip(
            TABLES, (vocabs.sites, vocabs.ner_tags, vocabs.industries), (tables.site, tables.ner, tables.industry),
            strict=True):
        (directory / vocab_file).write_text("\n".join(["[PAD]", "[UNK]", *entries]) + "\n", encoding="utf-8")
        np.save(directory / f"{name}.npy", table)

"""Query/title pairs for the benchmarks: the real QBQTC test set when present, else a synthetic stand-in.

The real data is never copied into the repository or the output folder; only its path and counts are
recorded. The synthetic generator draws Chinese characters from the model's vocabulary with lengths
shaped like the real pairs (about 34 tokens on average with [CLS]/[SEP], p99 about 80).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "qbqtc_test_public.jsonl"
SYNTHETIC_PAIRS = 5000


@dataclass(frozen=True)
class Pair:
    query: str
    title: str


@dataclass(frozen=True)
class PairSet:
    pairs: list[Pair]
    source: str  # "real: <path>" or "synthetic"

    @property
    def real(self) -> bool:
        return self.source.startswith("real")


def load_pairs(path: Path | None) -> PairSet:
    """Pairs with a non-blank query from `path` (JSONL with "query" and "title"), or synthetic ones."""
    if path is not None and path.is_file():
        pairs = []
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                doc = json.loads(line)
                query, title = str(doc.get("query") or ""), str(doc.get("title") or "")
                if query.strip():
                    pairs.append(Pair(query, title))
        if pairs:
            return PairSet(pairs, f"real: {path}")
    return PairSet(synthetic_pairs(SYNTHETIC_PAIRS), "synthetic")


def _cjk_chars(vocab: Path) -> list[str]:
    chars = []
    with vocab.open(encoding="utf-8") as fh:
        for line in fh:
            tok = line.rstrip("\n")
            if len(tok) == 1 and "\u4e00" <= tok <= "\u9fff":
                chars.append(tok)
    return chars


def synthetic_pairs(n: int, seed: int = 7, vocab: Path | None = None) -> list[Pair]:
    """Random CJK text, one token per character: query ~8 and title ~23 characters, log-normal tails."""
    chars = _cjk_chars(vocab or REPO_ROOT / "vocab" / "ernie-3.0-zh-vocab.txt")
    if not chars:
        chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    rng = np.random.default_rng(seed)
    q_len = np.clip(np.rint(rng.lognormal(2.0, 0.4, n)), 1, 60).astype(int)
    t_len = np.clip(np.rint(rng.lognormal(3.0, 0.53, n)), 0, 200).astype(int)
    # Zipf-like character frequencies, as in real text.
    weights = 1.0 / np.arange(1, len(chars) + 1)
    weights /= weights.sum()
    out = []
    for q, t in zip(q_len.tolist(), t_len.tolist(), strict=True):
        ids = rng.choice(len(chars), size=q + t, p=weights)
        text = "".join(chars[i] for i in ids.tolist())
        out.append(Pair(text[:q], text[q:]))
    return out

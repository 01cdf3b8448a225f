"""The requests a run sends: rows of a JSONL file, or a synthetic set shaped like real search traffic.

A workload file has one JSON object per line with `query` (required, not blank) and optionally
`title`, `site`, `ner` (a list of strings) and `industry`; other keys (e.g. QBQTC's `label`, `id`)
are ignored, and a missing or null field is left out of the request, as the server treats it as
missing. Rows without a query are skipped and counted, because real data sets have a few; anything
else malformed is an error naming the line, so a bad file never turns into a misleading run.

The synthetic workload draws pairs with `synthetic_pairs` (CJK characters from the model's
vocabulary, about 34 tokens per pair with [CLS]/[SEP], p99 about 80) and adds a site, NER tags and
an industry drawn from the demo model's look-up vocabularies, some of them absent as in real logs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scoring.v1 import scoring_pb2
from tools.build_model.demo_vocab import INDUSTRIES, NER_TAGS, demo_sites

TEXT_FIELDS = ("query", "title", "site", "industry")
DEMO_VOCAB = Path(__file__).resolve().parents[1] / "vocab" / "ernie-3.0-zh-vocab.txt"


@dataclass(frozen=True)
class Pair:
    query: str
    title: str


class WorkloadError(ValueError):
    """The workload file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Workload:
    requests: list[scoring_pb2.ScoreRequest]
    source: str  # "file: <path>" or "synthetic: <n>, seed <s>"
    skipped: int = 0  # rows without a query

    def describe(self) -> dict[str, Any]:
        """Counts and lengths for the result file (never the text itself)."""
        q = np.array([len(r.query) for r in self.requests], float)
        t = np.array([len(r.title) for r in self.requests], float)
        # One token per CJK character plus [CLS] and two [SEP]: close to the tokenizer for Chinese text.
        pair = q + t + 3
        return {
            "source": self.source,
            "requests": len(self.requests),
            "skipped_rows": self.skipped,
            "query_chars_mean": round(float(q.mean()), 2),
            "title_chars_mean": round(float(t.mean()), 2),
            "pair_chars_with_specials": {
                "mean": round(float(pair.mean()), 2),
                "p90": round(float(np.percentile(pair, 90)), 1),
                "p99": round(float(np.percentile(pair, 99)), 1),
            },
            "with_site": int(sum(r.HasField("site") for r in self.requests)),
            "with_ner": int(sum(len(r.ner) > 0 for r in self.requests)),
            "with_industry": int(sum(r.HasField("industry") for r in self.requests)),
        }


def request_from_row(row: Any, where: str) -> scoring_pb2.ScoreRequest | None:
    """One request from a decoded JSONL row; None when it has no query. `where` prefixes errors."""
    if not isinstance(row, dict):
        raise WorkloadError(f"{where}: expected a JSON object, got {type(row).__name__}")
    values: dict[str, Any] = {}
    for key in TEXT_FIELDS:
        value = row.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise WorkloadError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        if value:  # empty = missing, as the server reads it
            values[key] = value
    if not values.get("query", "").strip():
        return None
    ner = row.get("ner")
    if ner is not None:
        if not isinstance(ner, list) or not all(isinstance(tag, str) for tag in ner):
            raise WorkloadError(f"{where}: 'ner' must be a list of strings")
        values["ner"] = ner
    return scoring_pb2.ScoreRequest(**values)


def load_workload(path: Path, limit: int | None = None) -> Workload:
    """The requests in a JSONL file (at most `limit` of them); WorkloadError says what is wrong."""
    if not path.exists():
        raise WorkloadError(f"workload file {path} does not exist")
    if not path.is_file():
        raise WorkloadError(f"workload {path} is not a file")
    requests: list[scoring_pb2.ScoreRequest] = []
    skipped = 0
    try:
        with path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise WorkloadError(f"{where}: not JSON ({exc.msg})") from None
                request = request_from_row(row, where)
                if request is None:
                    skipped += 1
                    continue
                requests.append(request)
                if limit is not None and len(requests) >= limit:
                    break
    except UnicodeDecodeError as exc:
        raise WorkloadError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise WorkloadError(f"cannot read workload file {path}: {exc.strerror}") from None
    if not requests:
        raise WorkloadError(f"{path}: no rows with a non-blank 'query' ({skipped} without one)")
    return Workload(requests, f"file: {path}", skipped)


def synthetic_workload(n: int, seed: int = 7) -> Workload:
    """`n` synthetic requests; the same `n` and `seed` give the same requests."""
    if n < 1:
        raise WorkloadError("a synthetic workload needs at least 1 request")
    rng = np.random.default_rng(seed)
    sites = demo_sites(200, seed)
    # Zipf-like popularity for sites, as a few big sites take most results.
    site_p = 1.0 / np.arange(1, len(sites) + 1)
    site_p /= site_p.sum()
    requests = []
    for pair in synthetic_pairs(n, seed=seed):
        values: dict[str, Any] = {"query": pair.query}
        if pair.title:
            values["title"] = pair.title
        if rng.random() < 0.9:
            values["site"] = sites[int(rng.choice(len(sites), p=site_p))]
        n_ner = int(rng.poisson(1.2))
        if n_ner:
            values["ner"] = [NER_TAGS[int(i)] for i in rng.integers(0, len(NER_TAGS), size=min(n_ner, 8))]
        if rng.random() < 0.7:
            values["industry"] = INDUSTRIES[int(rng.integers(0, len(INDUSTRIES)))]
        requests.append(scoring_pb2.ScoreRequest(**values))
    return Workload(requests, f"synthetic: {n}, seed {seed}")


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
    chars = _cjk_chars(vocab or DEMO_VOCAB)
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

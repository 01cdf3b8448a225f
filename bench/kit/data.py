"""Query/title pairs for the benchmarks (the real QBQTC test set when present, else `loadtest.workload`'s
synthetic stand-in) and the serialized requests built from them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loadtest.openloop import serialize_requests
from loadtest.workload import Pair, synthetic_pairs

if TYPE_CHECKING:
    from model_format.features import EncodedRequest, FeatureEncoder

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "qbqtc_test_public.jsonl"
SYNTHETIC_PAIRS = 5000


@dataclass(frozen=True)
class PairSet:
    pairs: list[Pair]
    source: str  # "real: <path>" or "synthetic"

    @property
    def real(self) -> bool:
        return self.source.startswith("real")

    @property
    def described(self) -> str:
        return self.source if self.real else "synthetic (the real pairs file is absent)"


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


@dataclass(frozen=True)
class Workload:
    requests: list[bytes]
    source: str
    pairs: int


def encodable(encoder: FeatureEncoder, pairs: Iterable[Pair]) -> Iterator[tuple[Pair, EncodedRequest]]:
    """The pairs the model can encode, with their model inputs (a pair with no tokens would be refused as
    INVALID_ARGUMENT and counted as a failure that is not the server's)."""
    from model_format.features import FeatureError

    for p in pairs:
        try:
            yield p, encoder.encode(p.query, p.title or None)
        except FeatureError:
            continue


def load_requests(version_dir: Path, data: Path | None) -> Workload:
    """Serialized ScoreRequests for every pair the model can encode."""
    from model_format.features import FeatureEncoder
    from model_format.manifest import read_manifest
    from scoring.v1 import scoring_pb2

    pairs = load_pairs(data)
    kept = [scoring_pb2.ScoreRequest(query=p.query, title=p.title or None)
            for p, _ in encodable(FeatureEncoder(version_dir, read_manifest(version_dir)), pairs.pairs)]
    return Workload(serialize_requests(kept), pairs.described, len(kept))


def newest_version(model_repo: Path, model: str) -> Path:
    from model_format.repository import latest_complete, scan_model

    found = latest_complete(scan_model(model_repo, model, verify_checksums=False))
    if found is None:
        raise SystemExit(f"no complete version of {model} in {model_repo}; run `make demo` first")
    return found.path

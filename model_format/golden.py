"""Golden requests: a version proves, before it may serve, that it still computes what it computed
when it was built. Catches a wrong precision variant, a broken graph or a mismatched tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from model_format.features import FeatureEncoder, pad_batch
from model_format.manifest import Manifest


class Engine(Protocol):
    """What a golden check needs of an engine (the server's ModelRuntime is one)."""

    @property
    def precision(self) -> str: ...

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...


class GoldenMismatch(ValueError):
    """The version's scores on its golden requests differ from the recorded ones."""


@dataclass(frozen=True)
class GoldenRequest:
    query: str
    title: str | None
    site: str | None
    ner: tuple[str, ...]
    industry: str | None
    scores: tuple[float, ...]  # one per manifest head, in order

    def to_json(self) -> str:
        return json.dumps({"query": self.query, "title": self.title, "site": self.site, "ner": list(self.ner),
                           "industry": self.industry, "scores": list(self.scores)}, ensure_ascii=False)

    @staticmethod
    def from_json(line: str) -> GoldenRequest:
        d = json.loads(line)
        return GoldenRequest(d["query"], d.get("title"), d.get("site"), tuple(d.get("ner", ())),
                             d.get("industry"), tuple(float(x) for x in d["scores"]))


GOLDEN_CHUNK = 4


def read_golden(path: Path) -> list[GoldenRequest]:
    return [GoldenRequest.from_json(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_golden(version_dir: Path, manifest: Manifest, features: FeatureEncoder, runtime: Engine) -> float:
    """Raises GoldenMismatch unless every golden score is within the precision's tolerance.

    Returns the largest difference seen (0.0 when the version ships no golden requests)."""
    spec = manifest.golden
    if spec is None:
        return 0.0
    tolerance = spec.tolerance.get(runtime.precision)
    if tolerance is None:
        raise GoldenMismatch(f"golden requests have no tolerance for precision {runtime.precision}")
    golden = read_golden(version_dir / spec.file)
    if not golden:
        raise GoldenMismatch(f"{spec.file} holds no requests")
    encoded = [features.encode(g.query, g.title, g.site, g.ner, g.industry) for g in golden]
    # Small batches: each run competes for the CPU with the version that serves meanwhile.
    got = np.concatenate([runtime.run(pad_batch(encoded[i : i + GOLDEN_CHUNK]))
                          for i in range(0, len(encoded), GOLDEN_CHUNK)])
    want = np.array([g.scores for g in golden], np.float32)
    if got.shape != want.shape:
        raise GoldenMismatch(f"golden scores have shape {want.shape}, the graph gives {got.shape}")
    diff = float(np.abs(got - want).max())
    if not diff <= tolerance:
        raise GoldenMismatch(f"golden scores differ by {diff:.3g} (tolerance {tolerance:g} for {runtime.precision})")
    return diff

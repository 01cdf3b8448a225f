"""The model every peer serves: the version's encoder, an ORT session built as the raw engine's
(`bench.kit.engine.load_engine`, so any difference comes from the serving stack), the request/response mapping."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.kit.engine import Engine, load_engine
from model_format.features import EncodedRequest, FeatureEncoder, FeatureError, pad_batch
from model_format.manifest import Manifest, read_manifest
from scoring.v1 import scoring_pb2


@dataclass
class PeerModel:
    manifest: Manifest
    encoder: FeatureEncoder
    engine: Engine

    @classmethod
    def load(cls, version_dir: Path, threads: int) -> PeerModel:
        manifest = read_manifest(version_dir)
        return cls(manifest, FeatureEncoder(version_dir, manifest), load_engine(version_dir, manifest, "fp32", threads))

    def encode(self, request: scoring_pb2.ScoreRequest) -> EncodedRequest:
        """Raises FeatureError for a blank query or one without tokens."""
        if not request.query.strip():
            raise FeatureError("query is blank")

        def opt(name: str) -> str | None:
            return getattr(request, name) if request.HasField(name) else None

        return self.encoder.encode(request.query, opt("title"), opt("site"), list(request.ner), opt("industry"))

    def score(self, items: Sequence[EncodedRequest]) -> np.ndarray:
        """[len(items), heads] in the order given: one ORT run, padded to the longest item."""
        return self.engine.run(pad_batch(items))

    def response(self, row: np.ndarray, request: scoring_pb2.ScoreRequest) -> scoring_pb2.ScoreResponse:
        scores = dict(zip(self.manifest.srcids, row.tolist(), strict=True))
        if request.srcids:  # the subset asked for; unknown srcids are simply left out (no validation here)
            scores = {s: scores[s] for s in request.srcids if s in scores}
        return scoring_pb2.ScoreResponse(scores=scores, model=self.manifest.model, version=self.manifest.version)

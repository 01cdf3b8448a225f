"""What every peer shares: the model version's encoder, ORT session and the request/response mapping."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.kit.engine import Engine, load_engine
from model_format.features import EncodedRequest, FeatureEncoder, pad_batch
from model_format.manifest import Manifest, read_manifest
from scoring.v1 import scoring_pb2


@dataclass
class PeerModel:
    manifest: Manifest
    encoder: FeatureEncoder
    engine: Engine
    srcids: tuple[int, ...]

    @classmethod
    def load(cls, version_dir: Path, threads: int, precision: str = "fp32") -> PeerModel:
        manifest = read_manifest(version_dir)
        # Same session options as the raw engine measured by bench.engine (and the server's runtime).
        engine = load_engine(version_dir, manifest, precision, threads)
        return cls(manifest, FeatureEncoder(version_dir, manifest), engine, manifest.srcids)

    def encode(self, request: scoring_pb2.ScoreRequest) -> EncodedRequest:
        """Raises model_format.features.FeatureError for a query without tokens."""
        return self.encoder.encode(
            request.query,
            request.title if request.HasField("title") else None,
            request.site if request.HasField("site") else None,
            list(request.ner),
            request.industry if request.HasField("industry") else None,
        )

    def score(self, items: Sequence[EncodedRequest]) -> np.ndarray:
        """[len(items), heads] in the order given: one ORT run, padded to the longest item."""
        return self.engine.run(pad_batch(items))

    def response(self, row: np.ndarray, request: scoring_pb2.ScoreRequest) -> scoring_pb2.ScoreResponse:
        scores = dict(zip(self.srcids, row.tolist(), strict=True))
        if request.srcids:  # the subset asked for; unknown srcids are simply left out (no validation here)
            scores = {s: scores[s] for s in request.srcids if s in scores}
        return scoring_pb2.ScoreResponse(scores=scores, model=self.manifest.model, version=self.manifest.version)

"""Clients of the scoring.v1.Scorer service (the generated stubs are in `scoring.v1`)."""

from scoring_client.streams import ScoreError, StreamingScorer

__all__ = ["ScoreError", "StreamingScorer"]

"""Every precision variant a version ships is servable and agrees with fp32 as its golden tolerance says."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tests.helpers import build_small_model
from tests.server_harness import run_server


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_variant_serves_and_passes_its_golden_check(tmp_path: Path, precision: str) -> None:
    build_small_model(tmp_path, version=1, precisions=("fp32", precision))
    with run_server(tmp_path, "--cache-bytes", "0") as fp32, \
            grpc.insecure_channel(fp32.target) as ch:
        want = scoring_pb2_grpc.ScorerStub(ch).Score(  # type: ignore[no-untyped-call]
            scoring_pb2.ScoreRequest(query="北京旅游攻略", title="去哪儿"), timeout=10)
    with run_server(tmp_path, "--precision", precision, "--cache-bytes", "0") as srv:
        with grpc.insecure_channel(srv.target) as ch:
            stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
            info = stub.GetModelInfo(scoring_pb2.ModelInfoRequest(), timeout=10)
            got = stub.Score(scoring_pb2.ScoreRequest(query="北京旅游攻略", title="去哪儿"), timeout=10)
        assert info.precision == precision
        diff = max(abs(got.scores[k] - want.scores[k]) for k in want.scores)
        assert 0 < diff < {"int8": 0.1, "fp16": 0.02}[precision], diff
        ready = [e for e in srv.events() if e.get("event") == "model_warmed"]
        assert ready and ready[0]["precision"] == precision

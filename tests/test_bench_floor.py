"""The transport floor that `bench.compare` measures: the canned-answer gRPC server over loopback, and the
ceiling it derives from the raw engine's loss under that server's load."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from bench.compare import ceiling
from bench.peers.canned_server import SERVICE
from bench.peers.procs import PeerProcess
from model_format.manifest import read_manifest
from scoring.v1 import scoring_pb2
from tests.helpers import SmallModelFactory
from tests.server_harness import REPO_ROOT, free_port


def test_canned_server_answers_every_head_and_refuses_a_malformed_request(
        small_model_factory: SmallModelFactory, tmp_path: Path) -> None:
    version_dir = small_model_factory(num_heads=3, srcids=[11, 22, 33], seed=0)
    manifest = read_manifest(version_dir)
    request = scoring_pb2.ScoreRequest(query="北京天气", title="今天").SerializeToString()
    port = free_port()
    peer = PeerProcess("canned", ["-m", "bench.peers.canned_server", "--version-dir", str(version_dir),
                                  "--port", str(port)], port, request, cwd=REPO_ROOT,
                       log_path=tmp_path / "canned.log")
    peer.start(timeout=60)
    try:
        with grpc.insecure_channel(peer.target) as channel:
            call = channel.unary_unary(f"/{SERVICE}/Score", request_serializer=None, response_deserializer=None)
            reply = scoring_pb2.ScoreResponse.FromString(call(request, timeout=5))
            assert sorted(reply.scores) == [11, 22, 33]
            assert (reply.model, reply.version) == (manifest.model, manifest.version)
            with pytest.raises(grpc.RpcError) as err:
                call(b"\x0a\x02\xff\xfe", timeout=5)  # field 1 (query) holding invalid UTF-8
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        assert peer.stop()["returncode"] == 0


@pytest.mark.parametrize(("share", "at"), [(0.96, 0.9), (0.8, 0.9), (0.5, 0.5)])
def test_ceiling_is_where_the_engines_loss_meets_the_rate(share: float, at: float) -> None:
    x = ceiling(share, at)
    # The engine keeps 1 - (1 - share) * x / at of its speed at rate x; at the ceiling that equals x.
    assert x == pytest.approx(1.0 - (1.0 - share) * x / at)
    assert (x <= share) == (x >= at)  # above the measured rate the loss is larger, below it smaller
    assert ceiling(1.0, at) == 1.0

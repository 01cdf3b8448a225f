"""What `bench.compare` stands on: the canned-answer gRPC server over loopback and the ceiling it derives from the
raw engine's loss under that server's load (the transport floor), the naive peer, and ending a peer's leftover
processes."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc
import pytest

from bench.compare import ceiling
from bench.kit.machine import ProcessTree, alive
from bench.peers.procs import PeerProcess
from loadtest.openloop import SCORE_METHOD
from model_format.manifest import read_manifest
from scoring.v1 import scoring_pb2
from tests.helpers import SmallModelFactory


def test_canned_server_answers_every_head_and_refuses_a_malformed_request(
        small_model_factory: SmallModelFactory, tmp_path: Path) -> None:
    version_dir = small_model_factory(num_heads=3, srcids=[11, 22, 33], seed=0)
    manifest = read_manifest(version_dir)
    request = scoring_pb2.ScoreRequest(query="北京天气", title="今天").SerializeToString()
    peer = PeerProcess("canned_server", ["--version-dir", str(version_dir)], request, tmp_path / "canned.log")
    peer.start(timeout=60)
    try:
        with peer.channel() as channel:
            call = channel.unary_unary(SCORE_METHOD, request_serializer=None, response_deserializer=None)
            reply = scoring_pb2.ScoreResponse.FromString(call(request, timeout=5))
            assert sorted(reply.scores) == [11, 22, 33]
            assert (reply.model, reply.version) == (manifest.model, manifest.version)
            with pytest.raises(grpc.RpcError) as err:
                call(b"\x0a\x02\xff\xfe", timeout=5)  # field 1 (query) holding invalid UTF-8
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        assert peer.stop() == 0
        assert peer.leftovers == 0


@pytest.mark.parametrize(("share", "at"), [(0.96, 0.9), (0.8, 0.9), (0.5, 0.5)])
def test_ceiling_is_where_the_engines_loss_meets_the_rate(share: float, at: float) -> None:
    x = ceiling(share, at)
    # The engine keeps 1 - (1 - share) * x / at of its speed at rate x; at the ceiling that equals x.
    assert x == pytest.approx(1.0 - (1.0 - share) * x / at)
    assert (x <= share) == (x >= at)  # above the measured rate the loss is larger, below it smaller
    assert ceiling(1.0, at) == 1.0


def test_naive_peer_scores_the_heads_asked_for_and_refuses_a_blank_query(
        small_model_factory: SmallModelFactory, tmp_path: Path) -> None:
    version_dir = small_model_factory(num_heads=3, srcids=[11, 22, 33], seed=0)
    request = scoring_pb2.ScoreRequest(query="北京天气", srcids=[22, 33])
    peer = PeerProcess("naive_server", ["--version-dir", str(version_dir), "--threads", "1"],
                       request.SerializeToString(), tmp_path / "naive.log")
    peer.start(timeout=60)
    try:
        with peer.channel() as channel:
            call = channel.unary_unary(SCORE_METHOD, request_serializer=scoring_pb2.ScoreRequest.SerializeToString,
                                       response_deserializer=scoring_pb2.ScoreResponse.FromString)
            assert sorted(call(request, timeout=5).scores) == [22, 33]
            with pytest.raises(grpc.RpcError) as err:
                call(scoring_pb2.ScoreRequest(query="  "), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        assert peer.stop() == 0


def test_process_tree_ends_the_descendants_that_outlive_their_root() -> None:
    root = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    tree = ProcessTree(root.pid)
    deadline = time.monotonic() + 10
    while len(tree.seen) < 3 and time.monotonic() < deadline:
        tree.remember()
        time.sleep(0.05)
    children = [p for p in tree.seen if p != root.pid]
    assert len(children) == 2
    root.kill()
    root.wait()
    assert all(alive(p) for p in children)  # orphaned, still running
    assert tree.end_leftovers() == 2
    assert not any(alive(p) for p in children)
    assert tree.end_leftovers() == 0

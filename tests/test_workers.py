"""--workers: several processes share the port, each with its own engine; swaps reach all of them."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from scoring.v1 import admin_pb2, admin_pb2_grpc, scoring_pb2, scoring_pb2_grpc
from server.resources import cpu_limit
from tests.helpers import build_small_model
from tests.server_harness import ServerProcess, run_server, scrape


def _serving_versions(srv: ServerProcess, workers: int) -> list[int]:
    versions = []
    for i in range(workers):
        with grpc.insecure_channel(f"127.0.0.1:{srv.admin_port + i}") as ch:
            stub = admin_pb2_grpc.ModelAdminStub(ch)  # type: ignore[no-untyped-call]
            try:
                models = stub.ListModels(admin_pb2.ListModelsRequest(), timeout=10).models
            except grpc.RpcError as err:
                # A worker still starting has no admin port yet; the caller polls until all serve.
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                models = []
            versions.append(models[0].serving_version if models else 0)
    return versions


def test_two_workers_share_the_port_and_both_swap(tmp_path: Path) -> None:
    build_small_model(tmp_path, version=1, seed=1)
    with run_server(tmp_path, "--poll-interval-s", "0.2", workers=2) as srv:
        deadline = time.monotonic() + 60
        while _serving_versions(srv, 2) != [1, 1]:
            assert time.monotonic() < deadline, "both workers must serve"
            time.sleep(0.2)
        for i in range(40):  # new connections spread over the workers (SO_REUSEPORT balances connections)
            with grpc.insecure_channel(srv.target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
                assert stub.Score(scoring_pb2.ScoreRequest(query=f"北京{i}"), timeout=10).version == 1
        per_worker = []
        for i in range(2):
            metrics = scrape(srv, i)
            per_worker.append(metrics.get('model_pv_total{model="tiny",version="1"}', 0.0))
            # Each worker's engine gets its share of the cores, not every core.
            assert metrics['scoring_engine_lanes{model="tiny",version="1"}'] == max(1, cpu_limit() // 2)
        assert sum(per_worker) == 40 and min(per_worker) > 0, per_worker

        build_small_model(tmp_path, version=2, seed=2)
        deadline = time.monotonic() + 60
        while _serving_versions(srv, 2) != [2, 2]:
            assert time.monotonic() < deadline, "the swap must reach every worker"
            time.sleep(0.2)
        assert srv.stop() == 0

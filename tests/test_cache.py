"""Result cache and coalescing, through a real server: exact answers, version-keyed, bounded, shared."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from model_format.features import FeatureEncoder, pad_batch
from model_format.manifest import read_manifest
from scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tests.helpers import build_small_model
from tests.server_harness import ServerProcess, run_server, scrape


def direct(version_dir: Path, query: str) -> dict[int, float]:
    manifest = read_manifest(version_dir)
    enc = FeatureEncoder(version_dir, manifest).encode(query)
    row = ort.InferenceSession(str(version_dir / "model.onnx")).run(["scores"], pad_batch([enc]))[0][0]
    return dict(zip(manifest.srcids, row.tolist(), strict=True))


def score(srv: ServerProcess, query: str, srcids: tuple[int, ...] = ()) -> scoring_pb2.ScoreResponse:
    with grpc.insecure_channel(srv.target) as ch:
        stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
        resp: scoring_pb2.ScoreResponse = stub.Score(scoring_pb2.ScoreRequest(query=query, srcids=srcids),
                                                     timeout=10)
        return resp


def counter(srv: ServerProcess, name: str) -> float:
    return sum(v for k, v in scrape(srv).items() if k.startswith(name))


def test_cached_answers_are_the_computed_ones_and_versions_never_mix(tmp_path: Path) -> None:
    build_small_model(tmp_path, version=1, seed=1)
    with run_server(tmp_path, "--cache-bytes", "1000000", "--poll-interval-s", "0.2") as srv:
        first = score(srv, "北京旅游攻略")
        second = score(srv, "北京旅游攻略")
        subset = score(srv, "北京旅游攻略", srcids=(3,))
        assert dict(first.scores) == dict(second.scores)
        assert dict(subset.scores) == {3: first.scores[3]}
        want = direct(tmp_path / "tiny" / "1", "北京旅游攻略")
        assert max(abs(first.scores[k] - want[k]) for k in want) <= 1e-5
        assert counter(srv, "scoring_cache_hits_total") == 2
        assert counter(srv, "scoring_cache_misses_total") == 1

        build_small_model(tmp_path, version=2, seed=2)
        deadline = time.monotonic() + 30
        while (after := score(srv, "北京旅游攻略")).version != 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        want2 = direct(tmp_path / "tiny" / "2", "北京旅游攻略")
        assert max(abs(after.scores[k] - want2[k]) for k in want2) <= 1e-5
        assert max(abs(after.scores[k] - first.scores[k]) for k in want2) > 1e-3, "v2 must not reuse v1's entry"


def test_cache_stays_within_its_memory_bound(tmp_path: Path) -> None:
    build_small_model(tmp_path, version=1)
    bound = 3000  # a handful of entries
    with run_server(tmp_path, "--cache-bytes", str(bound)) as srv:
        for i in range(30):
            score(srv, f"查询{i}")
        metrics = scrape(srv)
        assert 0 < metrics["scoring_cache_bytes"] <= bound
        assert metrics["scoring_cache_entries"] < 30
        assert metrics["scoring_cache_evictions_total"] == 30 - metrics["scoring_cache_entries"]
        # The most recent entry is still there; the oldest is gone.
        hits = counter(srv, "scoring_cache_hits_total")
        score(srv, "查询29")
        assert counter(srv, "scoring_cache_hits_total") == hits + 1
        score(srv, "查询0")
        assert counter(srv, "scoring_cache_hits_total") == hits + 1


def test_ttl_expires_entries(tmp_path: Path) -> None:
    build_small_model(tmp_path, version=1)
    with run_server(tmp_path, "--cache-bytes", "100000", "--cache-ttl-s", "0.3") as srv:
        score(srv, "天气")
        score(srv, "天气")
        assert counter(srv, "scoring_cache_hits_total") == 1
        time.sleep(0.5)
        score(srv, "天气")
        assert counter(srv, "scoring_cache_hits_total") == 1


def test_identical_concurrent_requests_are_computed_once(tmp_path: Path) -> None:
    build_small_model(tmp_path, version=1)
    # A long queue delay holds the first request while the others arrive.
    with run_server(tmp_path, "--cache-bytes", "100000", "--max-queue-delay-ms", "300") as srv:

        async def burst() -> list[scoring_pb2.ScoreResponse]:
            async with grpc.aio.insecure_channel(srv.target) as ch:
                stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
                return list(await asyncio.gather(*(stub.Score(scoring_pb2.ScoreRequest(query="同一个查询"), timeout=10)
                                                   for _ in range(50))))

        responses = asyncio.run(burst())
        assert len({tuple(sorted(r.scores.items())) for r in responses}) == 1
        metrics = scrape(srv)
        assert metrics['scoring_batch_size_sum{model="tiny"}'] == 1, "computed once"
        assert metrics['scoring_cache_coalesced_total{model="tiny"}'] + \
            metrics['scoring_cache_hits_total{model="tiny"}'] == 49
        assert metrics['model_pv_total{model="tiny",version="1"}'] == 50


def test_a_follower_outlives_the_first_callers_deadline(tmp_path: Path) -> None:
    build_small_model(tmp_path, version=1)
    with run_server(tmp_path, "--cache-bytes", "100000", "--max-queue-delay-ms", "300") as srv:

        async def pair() -> tuple[grpc.StatusCode, scoring_pb2.ScoreResponse]:
            async with grpc.aio.insecure_channel(srv.target) as ch:
                stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
                req = scoring_pb2.ScoreRequest(query="先到的查询")

                async def impatient() -> grpc.StatusCode:
                    try:
                        await stub.Score(req, timeout=0.05)
                        return grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as err:
                        return err.code()

                first = asyncio.ensure_future(impatient())
                await asyncio.sleep(0.01)
                patient = await stub.Score(req, timeout=10)
                return await first, patient

        code, patient = asyncio.run(pair())
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(patient.scores) == 4
        want = direct(tmp_path / "tiny" / "1", "先到的查询")
        assert np.allclose([patient.scores[k] for k in want], list(want.values()), atol=1e-5)

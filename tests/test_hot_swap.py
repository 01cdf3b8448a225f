"""Hot swap under load: new versions dropped in by atomic rename, broken ones never served, rollback."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from model_format.features import FeatureEncoder, pad_batch
from model_format.manifest import read_manifest
from model_format.repository import check_version
from scoring.v1 import admin_pb2, admin_pb2_grpc, scoring_pb2, scoring_pb2_grpc
from tests.helpers import build_small_model
from tests.server_harness import ServerProcess, run_server, scrape

QUERIES = [f"查询{i} 北京旅游" + "攻略" * (i % 7) for i in range(12)]
SWAPS = 10


@dataclass
class Observed:
    version: int
    query: int
    scores: dict[int, float]


def direct_scores(version_dir: Path, query: str) -> dict[int, float]:
    manifest = read_manifest(version_dir)
    enc = FeatureEncoder(version_dir, manifest).encode(query)
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    row = session.run(["scores"], pad_batch([enc]))[0][0]
    return dict(zip(manifest.srcids, row.tolist(), strict=True))


async def steady_load(target: str, stop: threading.Event, out: list[Observed],
                      failures: list[str], workers: int = 6) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]

        async def worker(w: int) -> None:
            i = w
            while not stop.is_set():
                q = i % len(QUERIES)
                try:
                    resp = await stub.Score(scoring_pb2.ScoreRequest(query=QUERIES[q]), timeout=30)
                    out.append(Observed(resp.version, q, dict(resp.scores)))
                except grpc.aio.AioRpcError as err:
                    failures.append(f"{err.code().name}: {err.details()}")
                i += workers

        await asyncio.gather(*(worker(w) for w in range(workers)))


def admin_stub(channel: grpc.Channel) -> admin_pb2_grpc.ModelAdminStub:
    return admin_pb2_grpc.ModelAdminStub(channel)  # type: ignore[no-untyped-call]


def serving_version(server: ServerProcess) -> int:
    with grpc.insecure_channel(server.admin_target) as ch:
        models = admin_stub(ch).ListModels(admin_pb2.ListModelsRequest(model="tiny"), timeout=10).models
    return models[0].serving_version if models else 0


def wait_serving(server: ServerProcess, version: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while serving_version(server) != version:
        if time.monotonic() > deadline:
            raise AssertionError(f"v{version} never served:\n" + "\n".join(server.log_lines[-20:]))
        time.sleep(0.05)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    build_small_model(tmp_path, version=1, seed=1)
    return tmp_path


@pytest.fixture
def server(repo: Path) -> Iterator[ServerProcess]:
    with run_server(repo, "--poll-interval-s", "0.2", "--max-queue-delay-ms", "1") as srv:
        yield srv


def version_states(server: ServerProcess) -> dict[int, tuple[str, str]]:
    with grpc.insecure_channel(server.admin_target) as ch:
        models = admin_stub(ch).ListModels(admin_pb2.ListModelsRequest(model="tiny"), timeout=10).models
    return {v.version: (v.state, v.reason) for v in models[0].versions}


def test_ten_swaps_under_load_lose_nothing_and_never_mix(repo: Path, server: ServerProcess) -> None:
    observed: list[Observed] = []
    failures: list[str] = []
    stop = threading.Event()
    load = threading.Thread(target=lambda: asyncio.run(steady_load(server.target, stop, observed, failures)))
    load.start()
    try:
        time.sleep(0.5)
        for v in range(2, 2 + SWAPS):
            build_small_model(repo, version=v, seed=v)  # staged, then renamed into place
            wait_serving(server, v)
            time.sleep(0.2)
    finally:
        stop.set()
        load.join(timeout=60)
    assert failures == [], failures[:5]
    versions = {o.version for o in observed}
    assert versions == set(range(1, 2 + SWAPS)), f"each version answered: {sorted(versions)}"
    for v in versions:
        assert check_version(repo / "tiny" / str(v), "tiny", v).complete
    # A response labelled vN carries vN's scores: nothing was computed by another version.
    checked = 0
    for v in sorted(versions):
        sample = {o.query: o for o in observed if o.version == v}
        for q, o in list(sample.items())[:3]:
            want = direct_scores(repo / "tiny" / str(v), QUERIES[q])
            assert max(abs(o.scores[k] - want[k]) for k in want) <= 1e-5, (v, q)
            checked += 1
    assert checked >= 2 * len(versions)
    metrics = scrape(server)
    assert metrics['scoring_model_loads_total{model="tiny",outcome="ok"}'] == 1 + SWAPS
    assert sum(v for k, v in metrics.items() if k.startswith("model_lost_total")) == 0
    # Old versions were drained and released.
    states = version_states(server)
    assert states[1 + SWAPS][0] == "serving"
    assert all(states[v][0] == "unloaded" for v in range(1, 1 + SWAPS))


def _stage_then_rename(repo: Path, version: int, damage: str) -> None:
    """A version that is broken in one way, dropped in by rename like a good one."""
    staging = repo / "stage-area"
    shutil.rmtree(staging, ignore_errors=True)
    build_small_model(staging, version=version, seed=version)
    folder = staging / "tiny" / str(version)
    if damage == "corrupt-model":
        data = bytearray((folder / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "model.onnx").write_bytes(bytes(data))
    elif damage == "bad-manifest":
        (folder / "manifest.json").write_text('{"schema_version": 1, "model": "tiny"', encoding="utf-8")
    elif damage == "bad-golden":
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        golden = (folder / "golden.jsonl").read_text(encoding="utf-8").replace('"scores": [0.', '"scores": [9.')
        (folder / "golden.jsonl").write_text(golden, encoding="utf-8")
        from model_format.manifest import sha256_file

        manifest["sha256"]["golden.jsonl"] = sha256_file(folder / "golden.jsonl")
        (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (folder).rename(repo / "tiny" / str(version))
    shutil.rmtree(staging)


def test_broken_versions_never_serve_and_rollback_works(repo: Path, server: ServerProcess) -> None:
    build_small_model(repo, version=2, seed=2)
    wait_serving(server, 2)
    for version, damage in [(3, "corrupt-model"), (4, "bad-manifest"), (5, "bad-golden")]:
        _stage_then_rename(repo, version, damage)
    # A half-copied folder: files trickle in under the final name, the manifest is not there yet.
    half = repo / "tiny" / "6"
    half.mkdir()
    shutil.copy(repo / "tiny" / "2" / "tokenizer.json", half / "tokenizer.json")
    deadline = time.monotonic() + 30
    while True:
        states = version_states(server)
        if all(states.get(v, ("", ""))[0] == "failed" for v in (3, 4, 5, 6)):
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.1)
    assert "sha256 mismatch" in states[3][1]
    assert "manifest" in states[4][1].lower()
    assert "golden" in states[5][1].lower()
    assert "incomplete" in states[6][1]
    assert serving_version(server) == 2
    with grpc.insecure_channel(server.target) as ch:
        stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
        assert stub.Score(scoring_pb2.ScoreRequest(query="x"), timeout=10).version == 2
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(scoring_pb2.ScoreRequest(query="x", version=3), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert any(e.get("event") == "model_load_failed" and e.get("version") == 3 for e in server.events())
    assert scrape(server)['scoring_model_loads_total{model="tiny",outcome="failed"}'] >= 4

    # Rollback through the admin service: v1 serves again and stays pinned.
    with grpc.insecure_channel(server.admin_target) as ch:
        status = admin_stub(ch).Rollback(admin_pb2.ModelRef(model="tiny"), timeout=30)
    assert (status.serving_version, status.pinned_version) == (1, 1)
    with grpc.insecure_channel(server.target) as ch:
        stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
        assert stub.Score(scoring_pb2.ScoreRequest(query="x"), timeout=10).version == 1
    # The half-copied folder completes: it is retried because its files changed, but v1 stays pinned.
    shutil.rmtree(half)
    build_small_model(repo, version=7, seed=7)
    time.sleep(1.0)
    assert serving_version(server) == 1
    with grpc.insecure_channel(server.admin_target) as ch:
        status = admin_stub(ch).SetServingVersion(admin_pb2.VersionRef(model="tiny", version=0), timeout=30)
    assert status.serving_version == 7 and status.pinned_version == 0


def test_canary_version_and_admin_errors(repo: Path, server: ServerProcess) -> None:
    build_small_model(repo, version=2, seed=2)
    wait_serving(server, 2)
    with grpc.insecure_channel(server.admin_target) as ch:
        admin = admin_stub(ch)
        admin.LoadVersion(admin_pb2.VersionRef(model="tiny", version=1), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            admin.UnloadVersion(admin_pb2.VersionRef(model="tiny", version=2), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        for bad in ["../etc", "a/b", "", "x" * 65]:
            with pytest.raises(grpc.RpcError) as err:
                admin.LoadVersion(admin_pb2.VersionRef(model=bad, version=1), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        with pytest.raises(grpc.RpcError) as err:
            admin.LoadVersion(admin_pb2.VersionRef(model="tiny", version=99), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with grpc.insecure_channel(server.target) as ch:
        stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
        canary = stub.Score(scoring_pb2.ScoreRequest(query="杭州", version=1), timeout=10)
        serving = stub.Score(scoring_pb2.ScoreRequest(query="杭州"), timeout=10)
    assert (canary.version, serving.version) == (1, 2)
    want = direct_scores(repo / "tiny" / "1", "杭州")
    assert np.allclose([canary.scores[k] for k in want], list(want.values()), atol=1e-5)
    with grpc.insecure_channel(server.admin_target) as ch:
        admin_stub(ch).UnloadVersion(admin_pb2.VersionRef(model="tiny", version=1), timeout=30)
    with grpc.insecure_channel(server.target) as ch:
        stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(scoring_pb2.ScoreRequest(query="杭州", version=1), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_admin_token_is_required_when_set(repo: Path) -> None:
    with run_server(repo, "--admin-token", "s3cret-token") as srv:
        with grpc.insecure_channel(srv.admin_target) as ch:
            admin = admin_stub(ch)
            for metadata in [None, (("authorization", "Bearer wrong"),), (("authorization", "s3cret-token"),)]:
                with pytest.raises(grpc.RpcError) as err:
                    admin.ListModels(admin_pb2.ListModelsRequest(), timeout=10, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = admin.ListModels(admin_pb2.ListModelsRequest(), timeout=10,
                                  metadata=(("authorization", "Bearer s3cret-token"),))
            assert ok.models[0].model == "tiny"
        assert not any("s3cret-token" in line for line in srv.log_lines), "the token must never be logged"

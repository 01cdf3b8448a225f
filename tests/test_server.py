"""The Score service over real gRPC on loopback, against a direct ONNX Runtime run of the same model."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2

from model_format.features import FeatureEncoder, pad_batch
from model_format.manifest import read_manifest
from scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tests.server_harness import ServerProcess, run_server, scrape

TOL = 1e-5
QUERIES = ["北京旅游攻略", "感冒发烧吃什么药", "iphone 15 pro max 价格", "天气", "上海到杭州高铁时刻表",
           "如何注册一家有限责任公司需要哪些材料和流程", "抖音短视频怎么剪辑", "a"]
TITLES = [None, "北京旅游攻略大全_去哪儿攻略", "", "最新报价及参数配置 - 汽车之家", "百度知道" * 30]


@pytest.fixture(scope="module")
def version_dir(demo_repo: Path) -> Path:
    return demo_repo / "demo" / "1"


@pytest.fixture(scope="module")
def server(demo_repo: Path) -> Iterator[ServerProcess]:
    with run_server(demo_repo, "--max-queue-delay-ms", "5", "--cache-bytes", "0") as srv:  # the uncached path
        yield srv


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[scoring_pb2_grpc.ScorerStub]:
    with grpc.insecure_channel(server.target) as ch:
        yield scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]


class Reference:
    """ONNX Runtime alone on the same version: the numbers the server must reproduce."""

    def __init__(self, version_dir: Path) -> None:
        self.manifest = read_manifest(version_dir)
        self.features = FeatureEncoder(version_dir, self.manifest)
        self.session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])

    def scores(self, req: scoring_pb2.ScoreRequest) -> dict[int, float]:
        enc = self.features.encode(req.query, req.title or None, req.site or None, list(req.ner),
                                   req.industry or None)
        row = self.session.run(["scores"], pad_batch([enc]))[0][0]
        return dict(zip(self.manifest.srcids, row.tolist(), strict=True))


@pytest.fixture(scope="module")
def reference(version_dir: Path) -> Reference:
    return Reference(version_dir)


def make_request(rng: random.Random) -> scoring_pb2.ScoreRequest:
    req = scoring_pb2.ScoreRequest(query=rng.choice(QUERIES) + str(rng.randint(0, 999)))
    title = rng.choice(TITLES)
    if title is not None:
        req.title = title
    if rng.random() < 0.5:
        req.site = rng.choice(["baidu.com", "zhihu.com", "never-seen.example", ""])
    if rng.random() < 0.5:
        req.ner.extend(rng.sample(["LOC", "PER", "ORG", "NOT_A_TAG", "DISEASE"], k=rng.randint(1, 3)))
    if rng.random() < 0.3:
        req.industry = rng.choice(["旅游", "医疗健康", "未知行业"])
    return req


def assert_close(got: dict[int, float], want: dict[int, float]) -> None:
    assert set(got) == set(want)
    diff = max(abs(got[k] - want[k]) for k in want)
    assert diff <= TOL, f"max abs diff {diff}"


def test_score_alone_equals_direct_ort(stub: scoring_pb2_grpc.ScorerStub, reference: Reference) -> None:
    req = scoring_pb2.ScoreRequest(query="北京旅游攻略", title="北京旅游攻略大全", site="baidu.com",
                                   ner=["LOC"], industry="旅游", request_id="t-1")
    resp = stub.Score(req, timeout=30)
    assert resp.model == "demo" and resp.version == 1
    assert len(resp.scores) == 92
    assert all(0.0 <= v <= 1.0 for v in resp.scores.values())
    assert_close(dict(resp.scores), reference.scores(req))


def test_64_concurrent_mixed_lengths_equal_direct_ort(server: ServerProcess, reference: Reference) -> None:
    rng = random.Random(7)
    requests = [make_request(rng) for _ in range(64)]

    async def fire() -> list[scoring_pb2.ScoreResponse]:
        async with grpc.aio.insecure_channel(server.target) as ch:
            astub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
            return list(await asyncio.gather(*(astub.Score(r, timeout=60) for r in requests)))

    before = scrape(server)
    responses = asyncio.run(fire())
    after = scrape(server)
    for req, resp in zip(requests, responses, strict=True):
        assert_close(dict(resp.scores), reference.scores(req))
    key = 'scoring_batch_size_count{model="demo"}'
    batches = after[key] - before.get(key, 0.0)
    assert batches < 64, "64 concurrent requests should share batches"


def test_missing_title_and_site(stub: scoring_pb2_grpc.ScorerStub, reference: Reference) -> None:
    bare = stub.Score(scoring_pb2.ScoreRequest(query="天气预报"), timeout=30)
    empty = stub.Score(scoring_pb2.ScoreRequest(query="天气预报", title="", site="", industry=""), timeout=30)
    assert dict(bare.scores) == dict(empty.scores)
    assert_close(dict(bare.scores), reference.scores(scoring_pb2.ScoreRequest(query="天气预报")))
    with_title = stub.Score(scoring_pb2.ScoreRequest(query="天气预报", title="北京天气"), timeout=30)
    assert dict(with_title.scores) != dict(bare.scores)


def test_unknown_site_uses_unk_row_not_missing(stub: scoring_pb2_grpc.ScorerStub, reference: Reference) -> None:
    missing = stub.Score(scoring_pb2.ScoreRequest(query="天气"), timeout=30)
    unknown = stub.Score(scoring_pb2.ScoreRequest(query="天气", site="no-such-site.example"), timeout=30)
    assert dict(unknown.scores) != dict(missing.scores)
    assert_close(dict(unknown.scores), reference.scores(scoring_pb2.ScoreRequest(query="天气",
                                                                                 site="no-such-site.example")))


def test_srcid_subset(stub: scoring_pb2_grpc.ScorerStub) -> None:
    full = stub.Score(scoring_pb2.ScoreRequest(query="感冒吃什么药"), timeout=30)
    sub = stub.Score(scoring_pb2.ScoreRequest(query="感冒吃什么药", srcids=[757532, 111111]), timeout=30)
    assert set(sub.scores) == {757532, 111111}
    for k, v in sub.scores.items():
        assert v == full.scores[k]


def test_score_batch_equals_single_calls(stub: scoring_pb2_grpc.ScorerStub, reference: Reference) -> None:
    rng = random.Random(11)
    items = [make_request(rng) for _ in range(10)]
    items[3].srcids.extend([757531])
    resp = stub.ScoreBatch(scoring_pb2.ScoreBatchRequest(items=items), timeout=60)
    assert len(resp.results) == 10
    for item, result in zip(items, resp.results, strict=True):
        want = reference.scores(item)
        if item.srcids:
            want = {s: want[s] for s in item.srcids}
        assert_close(dict(result.scores), want)
        assert result.version == 1


def test_model_info(stub: scoring_pb2_grpc.ScorerStub) -> None:
    info = stub.GetModelInfo(scoring_pb2.ModelInfoRequest(), timeout=10)
    assert (info.model, info.version, info.precision) == ("demo", 1, "fp32")
    assert info.execution_provider == "CPUExecutionProvider"
    assert [h.srcid for h in info.heads][:2] == [111111, 757531]
    assert len(info.heads) == 92 and info.max_seq_len == 128


@pytest.mark.parametrize(
    ("request_", "code", "needle"),
    [
        (scoring_pb2.ScoreRequest(query=""), grpc.StatusCode.INVALID_ARGUMENT, "query is empty or blank"),
        (scoring_pb2.ScoreRequest(query=" \t\n　"), grpc.StatusCode.INVALID_ARGUMENT, "query is empty or blank"),
        (scoring_pb2.ScoreRequest(query="查" * 34000), grpc.StatusCode.INVALID_ARGUMENT, "query is 102000 bytes"),
        (scoring_pb2.ScoreRequest(query="x", srcids=[42]), grpc.StatusCode.INVALID_ARGUMENT, "srcids not in demo"),
        (scoring_pb2.ScoreRequest(query="x", srcids=[111111, 111111]), grpc.StatusCode.INVALID_ARGUMENT,
         "more than once"),
        (scoring_pb2.ScoreRequest(query="x", model="nope"), grpc.StatusCode.NOT_FOUND, "model 'nope'"),
        (scoring_pb2.ScoreRequest(query="x", version=7), grpc.StatusCode.NOT_FOUND, "version 7"),
        (scoring_pb2.ScoreRequest(query="x", version=-1), grpc.StatusCode.INVALID_ARGUMENT, "version must be"),
        (scoring_pb2.ScoreRequest(query="\x00\x01"), grpc.StatusCode.INVALID_ARGUMENT, "no tokens"),
        (scoring_pb2.ScoreRequest(query="x", ner=["LOC"] * 40), grpc.StatusCode.INVALID_ARGUMENT, "ner has 40"),
    ],
    ids=["empty", "blank", "100kB", "unknown-srcid", "dup-srcid", "unknown-model", "unknown-version",
         "negative-version", "control-chars-only", "too-many-ner"],
)
def test_bad_input_status(stub: scoring_pb2_grpc.ScorerStub, request_: scoring_pb2.ScoreRequest,
                          code: grpc.StatusCode, needle: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(request_, timeout=10)
    assert err.value.code() == code
    assert needle in (err.value.details() or "")


def test_invalid_utf8_is_invalid_argument(server: ServerProcess) -> None:
    # Field 1 (query), wire type 2, 2 bytes that are not UTF-8: the transport carries raw bytes.
    raw = b"\x0a\x02\xff\xfe"
    with grpc.insecure_channel(server.target) as ch:
        call = ch.unary_unary("/scoring.v1.Scorer/Score", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            call(raw, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in (err.value.details() or "")


def test_score_batch_errors_name_the_item(stub: scoring_pb2_grpc.ScorerStub) -> None:
    items = [scoring_pb2.ScoreRequest(query="ok"), scoring_pb2.ScoreRequest(query="  ")]
    with pytest.raises(grpc.RpcError) as err:
        stub.ScoreBatch(scoring_pb2.ScoreBatchRequest(items=items), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[1]" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        stub.ScoreBatch(scoring_pb2.ScoreBatchRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_every_request_is_counted(server: ServerProcess, stub: scoring_pb2_grpc.ScorerStub) -> None:
    before = scrape(server)
    stub.Score(scoring_pb2.ScoreRequest(query="计数"), timeout=10)
    stub.ScoreBatch(scoring_pb2.ScoreBatchRequest(items=[scoring_pb2.ScoreRequest(query="a")] * 3), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.Score(scoring_pb2.ScoreRequest(query=""), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.Score(scoring_pb2.ScoreRequest(query="x", model="nope"), timeout=10)
    after = scrape(server)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta('model_pv_total{model="demo",version="1"}') == 5
    assert delta('model_lost_total{model="demo",reason="invalid",version="1"}') == 1
    assert delta('model_pv_total{model="unknown",version="unknown"}') == 1
    assert delta('model_lost_total{model="unknown",reason="not_found",version="unknown"}') == 1


def test_health_is_serving(server: ServerProcess) -> None:
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    assert server.health("scoring.v1.Scorer") == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(server: ServerProcess) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as ch:
        rstub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = rstub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"scoring.v1.Scorer", "grpc.health.v1.Health"} <= names


def test_scores_are_deterministic_across_batch_companions(server: ServerProcess) -> None:
    """The same request scored alone and inside different concurrent mixes gives the same numbers."""
    probe = scoring_pb2.ScoreRequest(query="杭州西湖门票", title="西湖景区门票价格及开放时间")

    async def mix(seed: int) -> dict[int, float]:
        rng = random.Random(seed)
        others = [make_request(rng) for _ in range(rng.randint(5, 30))]
        async with grpc.aio.insecure_channel(server.target) as ch:
            astub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
            results = await asyncio.gather(astub.Score(probe, timeout=60),
                                           *(astub.Score(o, timeout=60) for o in others))
        return dict(results[0].scores)

    runs = [asyncio.run(mix(seed)) for seed in range(3)]
    base = np.array([runs[0][k] for k in sorted(runs[0])])
    for r in runs[1:]:
        assert np.abs(np.array([r[k] for k in sorted(r)]) - base).max() <= TOL

"""ScoreStream over real gRPC on loopback: per-item answers and statuses, accounting, cancellation, flow
control, and the StreamingScorer client helper, all against unary Score on the same server."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from bench.kit.scrape import metric_sum
from scoring.v1 import scoring_pb2, scoring_pb2_grpc
from scoring_client import ScoreError, StreamingScorer
from tests.server_harness import ServerProcess, run_server, scrape
from tests.test_server import make_request

TOL = 1e-6
PV = 'model_pv_total{model="demo",version="1"}'
STREAM_OK = 'scoring_request_duration_seconds_count{method="ScoreStream",model="demo"}'


def lost(values: dict[str, float], reason: str) -> float:
    return values.get(f'model_lost_total{{model="demo",reason="{reason}",version="1"}}', 0.0)


def lost_all(values: dict[str, float]) -> float:
    return metric_sum(values, "model_lost_total")


def pv_all(values: dict[str, float]) -> float:
    return metric_sum(values, "model_pv_total")


@pytest.fixture(scope="module")
def server(demo_repo: Path) -> Iterator[ServerProcess]:
    with run_server(demo_repo, "--cache-bytes", "0", "--max-stream-inflight", "16") as srv:
        yield srv


def unary_scores(server: ServerProcess, requests: list[scoring_pb2.ScoreRequest]) -> list[dict[int, float]]:
    with grpc.insecure_channel(server.target) as ch:
        stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
        return [dict(stub.Score(r, timeout=30).scores) for r in requests]


def assert_same(got: dict[int, float], want: dict[int, float]) -> None:
    assert set(got) == set(want)
    assert max(abs(got[k] - want[k]) for k in want) <= TOL


def mixed_items(rng: random.Random, stream: int, n: int) -> list[tuple[scoring_pb2.ScoreRequest, grpc.StatusCode]]:
    """Valid items with a few invalid ones among them, each with the status it must get."""
    items = []
    for i in range(n):
        req = make_request(rng)
        want = grpc.StatusCode.OK
        kind = rng.random()
        if kind < 0.1:
            req.query = "   "
            want = grpc.StatusCode.INVALID_ARGUMENT
        elif kind < 0.15:
            req.srcids.append(-12345)
            want = grpc.StatusCode.INVALID_ARGUMENT
        elif kind < 0.2:
            req.model = "no_such_model"
            want = grpc.StatusCode.NOT_FOUND
        req.request_id = f"s{stream}-{i}"
        items.append((req, want))
    return items


async def feed(items: list[scoring_pb2.ScoreRequest]) -> AsyncIterator[scoring_pb2.ScoreRequest]:
    for req in items:
        yield req
        await asyncio.sleep(0)


def test_stream_answers_equal_unary_under_64_streams_with_invalid_and_cancelled_items(server: ServerProcess) -> None:
    rng = random.Random(7)
    plans = [mixed_items(rng, s, 12) for s in range(64)]
    cancelled_streams = set(range(0, 64, 8))  # these are cancelled after their first answer
    before = scrape(server)

    async def one(stub: scoring_pb2_grpc.ScorerStub, s: int) -> dict[str, scoring_pb2.ScoreStreamResponse]:
        call = stub.ScoreStream(feed([req for req, _ in plans[s]]), timeout=60)
        answers = {}
        async for answer in call:
            answers[answer.request_id] = answer
            if s in cancelled_streams:
                call.cancel()
                break
        return answers

    async def run() -> list[dict[str, scoring_pb2.ScoreStreamResponse]]:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
            return await asyncio.gather(*(one(stub, s) for s in range(64)))

    results = asyncio.run(run())
    valid = [req for s in range(64) if s not in cancelled_streams for req, want in plans[s] if want.value[0] == 0]
    reference = dict(zip([r.request_id for r in valid], unary_scores(server, valid), strict=True))
    for s, answers in enumerate(results):
        if s in cancelled_streams:
            assert len(answers) == 1
            continue
        assert set(answers) == {req.request_id for req, _ in plans[s]}  # every item answered, once
        for req, want in plans[s]:
            answer = answers[req.request_id]
            assert answer.code == want.value[0], (req, answer)
            if want == grpc.StatusCode.OK:
                assert answer.result.version == 1
                assert_same(dict(answer.result.scores), reference[req.request_id])
            else:
                assert answer.message and not answer.HasField("result")
    time.sleep(0.5)  # the cancelled streams' accounting happens as the server sees them go
    after = scrape(server)
    items_seen = pv_all(after) - pv_all(before) - len(valid)  # the unary reference calls count too
    answered_ok = sum(1 for a in results for x in a.values() if x.code == 0)
    lost_seen = lost_all(after) - lost_all(before)
    written_ok = after[STREAM_OK] - before.get(STREAM_OK, 0.0)  # scored answers the server wrote
    # Every item that reached the server is accounted for: written with scores, or lost with a reason
    # (a cancelled stream's queued items and the scores it never got written included).
    assert items_seen == written_ok + lost_seen
    # The client read all of them but the answers a cancelled stream left unread in the transport.
    unread = sum(len(plans[s]) - len(results[s]) for s in cancelled_streams)
    assert answered_ok <= written_ok <= answered_ok + unread
    # (a cancelled stream may have sent invalid items too before it went)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert lost(after, "invalid") - lost(before, "invalid") >= sum(
        1 for s in range(64) if s not in cancelled_streams for _, w in plans[s] if w == invalid)


def test_item_time_budget_fails_only_that_item(server: ServerProcess) -> None:
    async def run() -> list[scoring_pb2.ScoreStreamResponse]:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
            # 40 long items queue ahead; the next has a 1 ms budget and cannot reach the engine in time.
            items = [scoring_pb2.ScoreRequest(query=f"北京旅游攻略{i}", title="去哪儿" * 60, request_id=f"long{i}")
                     for i in range(40)]
            items.append(scoring_pb2.ScoreRequest(query="天气", timeout_ms=1, request_id="hurried"))
            items.append(scoring_pb2.ScoreRequest(query="天气", request_id="patient"))
            return [a async for a in stub.ScoreStream(iter(items), timeout=60)]

    answers = {a.request_id: a for a in asyncio.run(run())}
    assert answers["hurried"].code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "not computed" in answers["hurried"].message
    assert answers["patient"].code == 0 and len(answers["patient"].result.scores) > 0
    assert all(answers[f"long{i}"].code == 0 for i in range(40))


def test_undecodable_message_is_answered_invalid_and_the_stream_lives_on(server: ServerProcess) -> None:
    good = scoring_pb2.ScoreRequest(query="天气", request_id="after").SerializeToString()
    bad_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (query) holding invalid UTF-8

    async def run() -> list[scoring_pb2.ScoreStreamResponse]:
        async with grpc.aio.insecure_channel(server.target) as ch:
            method = ch.stream_stream("/scoring.v1.Scorer/ScoreStream", request_serializer=None,
                                      response_deserializer=scoring_pb2.ScoreStreamResponse.FromString)
            return [a async for a in method(iter([bad_utf8, good]), timeout=30)]

    answers = asyncio.run(run())
    assert [a.code for a in answers if not a.request_id] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    assert [a.code for a in answers if a.request_id == "after"] == [0]


def test_cancelling_a_stream_drops_its_queued_items_before_compute(server: ServerProcess) -> None:
    ahead = scoring_pb2.ScoreBatchRequest(items=[scoring_pb2.ScoreRequest(query=f"排队{i}", title="标题" * 200)
                                                 for i in range(64)])
    before = scrape(server)

    async def run() -> None:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
            batch = stub.ScoreBatch(ahead, timeout=60)  # 64 long items keep the engine busy
            await asyncio.sleep(0.05)
            call = stub.ScoreStream(timeout=60)
            for i in range(16):  # as many as the stream may hold: all are read and queued behind them
                await call.write(scoring_pb2.ScoreRequest(query=f"长查询{i}", title="标题" * 200, request_id=str(i)))
            await asyncio.sleep(0.05)
            call.cancel()
            await batch

    asyncio.run(run())
    time.sleep(1.0)
    after = scrape(server)
    arrived = after[PV] - before[PV] - 64
    cancelled = lost(after, "cancelled") - lost(before, "cancelled")
    computed = metric_sum(after, "scoring_batch_size_sum") - metric_sum(before, "scoring_batch_size_sum") - 64
    assert arrived == cancelled > 0  # every item read was answered to nobody: lost, as cancelled
    assert computed < arrived  # and the queued ones were dropped, not computed


def test_a_client_that_does_not_read_cannot_make_the_server_buffer(server: ServerProcess) -> None:
    """The server holds at most --max-stream-inflight unanswered items and writes answers under gRPC flow
    control: once the client's receive window is full, the server stops reading. What is held is bounded
    by the windows (fixed here: no BDP probing), not by what the client sends."""
    before = scrape(server)

    async def run() -> tuple[float, float]:
        async with grpc.aio.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0)]) as ch:
            stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
            call = stub.ScoreStream(timeout=120)

            async def write_all() -> None:
                for i in range(3000):
                    await call.write(scoring_pb2.ScoreRequest(query=f"查询{i}", request_id=str(i)))
                await call.done_writing()

            writer = asyncio.get_running_loop().create_task(write_all())
            await asyncio.sleep(2.0)  # nothing is read meanwhile
            stalled_at = scrape(server)[PV] - before[PV]
            await asyncio.sleep(1.0)
            still = scrape(server)[PV] - before[PV]
            answers = [a async for a in call]  # now read: everything is answered
            await writer
            assert len(answers) == 3000 and all(a.code == 0 for a in answers)
            return stalled_at, still

    stalled_at, still = asyncio.run(run())
    assert stalled_at == still < 3000
    print(f"items read while the client did not read: {stalled_at:.0f}")


def test_streaming_scorer_multiplexes_concurrent_calls(server: ServerProcess) -> None:
    rng = random.Random(11)
    requests = [make_request(rng) for _ in range(200)]
    reference = unary_scores(server, requests)

    async def run() -> tuple[list[scoring_pb2.ScoreResponse], ScoreError]:
        async with grpc.aio.insecure_channel(server.target) as ch, StreamingScorer(ch, streams=3) as scorer:
            got = await asyncio.gather(*(scorer.score(r, timeout=30) for r in requests))
            with pytest.raises(ScoreError) as err:
                await scorer.score(scoring_pb2.ScoreRequest(query=""), timeout=5)
            again = await scorer.score(requests[0], timeout=30)  # the stream lives on after an error
            assert_same(dict(again.scores), reference[0])
            return list(got), err.value

    got, error = asyncio.run(run())
    for response, want in zip(got, reference, strict=True):
        assert_same(dict(response.scores), want)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "query" in error.message
    assert all(not r.request_id for r in requests)  # the caller's requests are left as they were

"""Queue limits, deadlines, health transitions and graceful shutdown of a real server process."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tests.server_harness import ServerProcess, run_server, scrape

LONG_TITLE = "北京旅游攻略大全自由行三日游路线推荐" * 4


async def _fire(target: str, n: int, timeout: float, delay_each: float = 0.0) -> list[grpc.StatusCode]:
    """n concurrent Score calls; the status code of each."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]

        async def one(i: int) -> grpc.StatusCode:
            await asyncio.sleep(delay_each * i)
            try:
                await stub.Score(scoring_pb2.ScoreRequest(query=f"查询{i}", title=LONG_TITLE), timeout=timeout)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as err:
                return err.code()

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def test_queue_full_is_refused_at_once_and_counted(demo_repo: Path) -> None:
    with run_server(demo_repo, "--max-queue-size", "4", "--max-batch-size", "2") as srv:
        t0 = time.monotonic()
        codes = asyncio.run(_fire(srv.target, 60, timeout=60))
        elapsed = time.monotonic() - t0
        refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert refused > 0 and codes.count(grpc.StatusCode.OK) > 0
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        m = scrape(srv)
        assert m['model_lost_total{model="demo",reason="queue_full",version="1"}'] == refused
        assert m['model_pv_total{model="demo",version="1"}'] == 60
        assert elapsed < 60


async def _burst(target: str, n: int, timeout: float) -> list[grpc.aio.AioRpcError | None]:
    """n concurrent Score calls with distinct long inputs; the error of each (None = OK)."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]

        async def one(i: int) -> grpc.aio.AioRpcError | None:
            try:
                # Not _fire's queries: those would be answered by the result cache.
                await stub.Score(scoring_pb2.ScoreRequest(query=f"突发{i}", title=LONG_TITLE), timeout=timeout)
                return None
            except grpc.aio.AioRpcError as err:
                return err

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def test_queue_is_bounded_by_estimated_engine_time(demo_repo: Path) -> None:
    """A burst worth more than --max-queue-wait-ms of engine work: the excess is refused, saying why."""
    with run_server(demo_repo, "--max-queue-wait-ms", "60", "--max-queue-size", "1024") as srv:
        asyncio.run(_fire(srv.target, 4, timeout=60, delay_each=0.2))  # timed batches feed the estimate
        errors = asyncio.run(_burst(srv.target, 120, timeout=60))
        refused = [e for e in errors if e is not None]
        assert refused and len(refused) < 120
        assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all("ms of engine work" in (e.details() or "") for e in refused)
        m = scrape(srv)
        assert m['model_lost_total{model="demo",reason="queue_full",version="1"}'] == len(refused)
        assert m['scoring_batch_size_sum{model="demo"}'] == 4 + 120 - len(refused)


def test_call_that_would_expire_in_the_queue_is_refused_at_once(demo_repo: Path) -> None:
    # Only the deadlines bound the queue.
    with run_server(demo_repo, "--max-queue-wait-ms", "600000", "--queue-target-ms", "600000") as srv:
        asyncio.run(_fire(srv.target, 4, timeout=60, delay_each=0.2))
        errors = asyncio.run(_burst(srv.target, 120, timeout=0.4))
        codes = [e.code() if e is not None else grpc.StatusCode.OK for e in errors]
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
        early = [e for e in errors if e is not None and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert early, codes
        assert all("deadline leaves" in (e.details() or "") for e in early)
        m = scrape(srv)
        assert m['model_lost_total{model="demo",reason="queue_full",version="1"}'] == len(early)


def test_expired_deadlines_are_not_computed(demo_repo: Path) -> None:
    with run_server(demo_repo, "--max-batch-size", "1", "--max-queue-delay-ms", "0") as srv:
        codes = asyncio.run(_fire(srv.target, 40, timeout=0.25))
        time.sleep(1.0)  # let the dispatcher reach and drop the expired items
        m = scrape(srv)
        expired = codes.count(grpc.StatusCode.DEADLINE_EXCEEDED)
        assert expired > 0
        computed = m['scoring_batch_size_sum{model="demo"}']  # warm-up does not go through the batcher
        assert computed < 40, "expired requests must be dropped before compute"
        lost = (m['model_lost_total{model="demo",reason="deadline",version="1"}']
                + m['model_lost_total{model="demo",reason="cancelled",version="1"}'])
        # A request computed just before its deadline may still reach the client late: not lost here. On a
        # loaded machine a call can also expire inside gRPC before it reaches the servicer: not ours to count.
        reached = m['model_pv_total{model="demo",version="1"}']
        assert lost <= expired
        assert computed + lost >= reached  # every call that reached the servicer: computed, or lost with a reason


def test_not_serving_without_a_model(tmp_path: Path) -> None:
    with run_server(tmp_path, wait=False) as srv:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            try:
                status = srv.health()
                break
            except grpc.RpcError:
                time.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert srv.health("liveness") == health_pb2.HealthCheckResponse.SERVING  # not a restart loop
        with grpc.insecure_channel(srv.target) as ch:
            stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
            try:
                stub.Score(scoring_pb2.ScoreRequest(query="x"), timeout=5)
                raise AssertionError("a server without a model must not answer")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND


def test_sigterm_answers_in_flight_then_exits(demo_repo: Path) -> None:
    with run_server(demo_repo, "--shutdown-delay-s", "1", "--grace-period-s", "20") as srv:

        async def scenario(server: ServerProcess) -> tuple[list[grpc.StatusCode], int]:
            calls = asyncio.ensure_future(_fire(server.target, 30, timeout=60))
            await asyncio.sleep(0.3)
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            health = await asyncio.to_thread(server.health)
            return await calls, health

        codes, health = asyncio.run(scenario(srv))
        assert health == health_pb2.HealthCheckResponse.NOT_SERVING
        assert codes == [grpc.StatusCode.OK] * 30, codes
        assert srv.proc.wait(timeout=30) == 0
        events = [e.get("event") for e in srv.events()]
        assert "shutdown" in events and "stopped" in events


def test_logs_are_json_with_request_id_and_no_line_per_request(demo_repo: Path) -> None:
    with run_server(demo_repo) as srv:
        with grpc.insecure_channel(srv.target) as ch:
            stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
            for i in range(20):
                stub.Score(scoring_pb2.ScoreRequest(query=f"正常{i}", request_id=f"ok-{i}"), timeout=30)
            with pytest.raises(grpc.RpcError):
                stub.Score(scoring_pb2.ScoreRequest(query=" ", request_id="bad-42"), timeout=30)
        time.sleep(0.3)
        assert srv.stop() == 0
    lines = [line for line in srv.log_lines if line.startswith("{")]
    events = srv.events()
    assert len(events) == len(lines), "every server log line is JSON"
    assert not any("ok-" in line for line in lines), "no log line per successful request"
    rejected = [e for e in events if e.get("event") == "rejected"]
    assert rejected and rejected[0]["request_id"] == "bad-42" and rejected[0]["reason"] == "invalid"
    lifecycle = {e.get("event") for e in events}
    assert {"model_loading", "model_warmed", "model_serving", "shutdown", "stopped"} <= lifecycle


def test_sigterm_ends_an_open_stream_after_answering_what_it_read(demo_repo: Path) -> None:
    """A ScoreStream open at shutdown: the server stops reading, answers every item it read, and ends the
    call with UNAVAILABLE (reconnect elsewhere); the process still exits cleanly within the grace period."""
    with run_server(demo_repo, "--grace-period-s", "20", "--cache-bytes", "0") as srv:

        async def scenario(server: ServerProcess) -> tuple[list[scoring_pb2.ScoreStreamResponse], grpc.StatusCode]:
            async with grpc.aio.insecure_channel(server.target) as ch:
                stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
                call = stub.ScoreStream(timeout=60)
                for i in range(20):
                    await call.write(scoring_pb2.ScoreRequest(query=f"关停前{i}", title="标题" * 30,
                                                              request_id=str(i)))
                await asyncio.sleep(0.2)
                server.proc.send_signal(signal.SIGTERM)
                answers = []
                try:
                    async for answer in call:
                        answers.append(answer)
                except grpc.aio.AioRpcError:
                    pass
                return answers, await call.code()

        answers, code = asyncio.run(scenario(srv))
        assert code == grpc.StatusCode.UNAVAILABLE, code
        assert sorted(int(a.request_id) for a in answers) == list(range(20))
        assert all(a.code == 0 for a in answers)
        assert srv.proc.wait(timeout=30) == 0

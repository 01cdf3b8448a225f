"""A short soak: the real server under steady open-loop load across two hot swaps.

`tests/test_hot_swap.py` checks the swap itself (ten swaps, never mixing versions, scores equal to the
version's own, broken versions, rollback). This test checks what a long run would show, in ~30 s: paced
load (each call sent at its time whatever the others do) answered without a single failure, every answer
naming a complete version, and the server's resident memory flat once it is warm. The full-length
version is `python -m bench.soak` (30 minutes on the demo model).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from bench.kit.scrape import rss_mib, serving_versions
from model_format.repository import check_version
from scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tests.helpers import build_small_model
from tests.server_harness import ServerProcess, run_server, scrape

RATE = 40.0  # calls per second, constant spacing
DURATION_S = 24.0
SWAP_AT_S = (8.0, 16.0)  # versions 2 and 3 are dropped in at these times
WARM_S = 3.0  # RSS baseline: from here until the first swap
# Generous on purpose: the allocator may keep what a swap's second session used. A leak of the request
# path (tens of thousands of calls) or of whole versions grows well past it.
RSS_BOUND_MIB, RSS_BOUND_RATIO = 48.0, 0.25


@dataclass
class Answer:
    sent_s: float
    code: str
    version: int


async def paced_load(target: str, answers: list[Answer]) -> None:
    """Open loop: call i leaves at i / RATE; distinct queries, so every call reaches the engine."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def one(i: int) -> None:
            query = f"北京{i}旅游攻略" + "景点" * (i % 9)
            try:
                resp = await stub.Score(scoring_pb2.ScoreRequest(query=query), timeout=10)
                answers.append(Answer(i / RATE, "OK", resp.version))
            except grpc.aio.AioRpcError as err:
                answers.append(Answer(i / RATE, err.code().name, 0))

        tasks = []
        for i in range(int(RATE * DURATION_S)):
            await asyncio.sleep(max(start + i / RATE - loop.time(), 0.0))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)


def wait_swapped(server: ServerProcess, version: int, timeout: float = 30.0) -> None:
    """Until `version` serves and no other version is loaded (the old one drained and released)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = scrape(server)
        loaded = {k for k, v in metrics.items() if k.startswith("scoring_model_info{") and v}
        if serving_versions(metrics) == [version] and len(loaded) == 1:
            return
        assert time.monotonic() < deadline, f"v{version} not alone after {timeout} s: {sorted(loaded)}"
        time.sleep(0.1)


@pytest.mark.slow
def test_steady_load_across_two_swaps_loses_nothing_and_rss_stays_flat(tmp_path: Path) -> None:
    build_small_model(tmp_path, model="tiny", version=1, seed=1)
    # Result cache off: repeated work would otherwise be answered without the engine (and the cache
    # itself grows up to its bound, which is not a leak).
    with run_server(tmp_path, "--poll-interval-s", "0.2", "--cache-bytes", "0") as server:
        answers: list[Answer] = []
        load = threading.Thread(target=lambda: asyncio.run(paced_load(server.target, answers)))
        rss: list[tuple[float, float]] = []
        t0 = time.monotonic()

        def sample_until(t_end: float) -> None:
            while time.monotonic() - t0 < t_end:
                rss.append((time.monotonic() - t0, rss_mib(server.proc.pid)))
                time.sleep(0.2)

        load.start()
        try:
            for version, at in enumerate(SWAP_AT_S, start=2):
                sample_until(at)
                build_small_model(tmp_path, model="tiny", version=version, seed=version)  # staged, then renamed
                wait_swapped(server, version)
            while load.is_alive():
                sample_until(time.monotonic() - t0 + 0.2)
        finally:
            load.join(timeout=60)
        metrics = scrape(server)
        end_rss = rss_mib(server.proc.pid)

    sent = int(RATE * DURATION_S)
    failures = [a for a in answers if a.code != "OK"]
    assert len(answers) == sent, f"{sent - len(answers)} calls never came back"
    assert failures == [], f"{len(failures)} failed, e.g. {failures[:5]}"
    versions = {a.version for a in answers}
    assert versions == {1, 2, 3}, f"answered by {sorted(versions)}"
    for v in versions:
        assert check_version(tmp_path / "tiny" / str(v), "tiny", v).complete, v
    assert sum(v for k, v in metrics.items() if k.startswith("model_lost_total")) == 0

    warm = [m for t, m in rss if WARM_S <= t < SWAP_AT_S[0]]
    assert warm, "no RSS sample between warm-up and the first swap"
    baseline = max(warm)
    bound = baseline + max(RSS_BOUND_MIB, RSS_BOUND_RATIO * baseline)
    late = [m for t, m in rss if t >= SWAP_AT_S[-1] + 2.0] + [end_rss]
    assert max(late) <= bound, (f"RSS grew from {baseline:.0f} MiB (warm, before any swap) to {max(late):.0f} MiB "
                                f"after two swaps (bound {bound:.0f} MiB); samples: {rss[::10]}")

"""Closed-loop load: C workers, each sending its next request as soon as the previous one answers.

    result = await run_closed_loop(channel, requests, ClosedLoopConfig(concurrency=8, duration_s=15))

A closed loop measures what a fixed number of synchronous clients get; the offered rate follows the
server (a slow server is sent less), so it cannot show queueing the way an open loop does, but it
answers "how fast do C callers go" and finds a throughput ceiling without choosing a rate. The result
has the same shape and summary as the open loop's (`RunResult`): latency is measured from each
actual send (there is no schedule to fall behind, so `send_lag_*` is 0), and the offered rate is the
number of requests sent per second of the sending period.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from loadtest.callers import open_caller
from loadtest.openloop import SCORE_METHOD, RunResult, check_run_config, default_window_start, rusage_self


@dataclass(frozen=True)
class ClosedLoopConfig:
    concurrency: int  # workers, each with one call in flight
    duration_s: float  # sending period: no worker starts a call after it
    timeout_s: float | None = 10.0  # per-call gRPC deadline; None = wait forever
    warmup_s: float | None = None  # start of the throughput window; None = 20% of duration_s
    method: str = SCORE_METHOD
    seed: int = 0
    metadata: tuple[tuple[str, str], ...] = ()  # sent with every call
    streams: int = 4  # ScoreStream calls the items share, when `method` is loadtest.callers.STREAM_METHOD

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        check_run_config(self)

    @property
    def window_start_s(self) -> float:
        return default_window_start(self.duration_s, self.warmup_s)

    def describe(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "mode": "closed"}


class ClosedLoopResult(RunResult[ClosedLoopConfig]):
    """The result of `run_closed_loop`."""


async def run_closed_loop(channel: grpc.aio.Channel, requests: Sequence[bytes], config: ClosedLoopConfig, *,
                          on_progress: Callable[[float], None] | None = None) -> ClosedLoopResult:
    """Runs `config.concurrency` workers for `config.duration_s`, then waits for the calls in flight.

    `requests` are serialized request messages; each worker sends a seeded random pick among them.
    `on_progress(fraction_of_duration)` is called about once a second.
    """
    if not requests:
        raise ValueError("no requests to send")
    rng = np.random.default_rng(config.seed)
    send, close = open_caller(channel, config.method, config.timeout_s, config.metadata, config.streams)
    # Appended in completion order; a worker's tuple is (sent, done, code) in seconds from the start.
    records: list[tuple[float, float, str]] = []

    async def worker(picks: np.ndarray, start: float) -> None:
        end = start + config.duration_s
        i = 0
        while (sent := time.perf_counter()) < end:
            body = requests[int(picks[i % len(picks)])]
            i += 1
            try:
                code = await send(body)
            except Exception as exc:  # a generator-side failure must still be counted
                code = f"CLIENT_{type(exc).__name__}"
            records.append((sent - start, time.perf_counter() - start, code))
            if code != "OK":
                # A failing server answers at once; without a pause the workers would spin on it and
                # count thousands of failures per second instead of measuring anything.
                await asyncio.sleep(0.01)

    async def report(start: float) -> None:
        # Only while sending: the final 100% is reported once, after the last answer.
        while (elapsed := time.perf_counter() - start + 1.0) < config.duration_s:
            await asyncio.sleep(1.0)
            if on_progress is not None:
                on_progress(elapsed / config.duration_s)

    # Each worker gets its own pick sequence, drawn up front so the loop does no random-number work.
    per_worker = max(1024, int(config.duration_s * 200))
    picks = [rng.integers(0, len(requests), size=per_worker) for _ in range(config.concurrency)]
    cpu0, (user0, sys0) = time.process_time(), rusage_self()
    start = time.perf_counter()
    reporter = asyncio.create_task(report(start))
    try:
        await asyncio.gather(*(worker(p, start) for p in picks))
    finally:
        reporter.cancel()
        await close()
    wall = time.perf_counter() - start
    cpu1, (user1, sys1) = time.process_time(), rusage_self()
    if on_progress is not None:
        on_progress(1.0)
    records.sort(key=lambda r: r[0])
    sent_s = np.array([r[0] for r in records], float)
    done_s = np.array([r[1] for r in records], float)
    return ClosedLoopResult(
        config=config,
        scheduled_s=sent_s,
        latency_s=done_s - sent_s,
        completed_s=done_s,
        codes=[r[2] for r in records],
        send_lag_s=np.zeros(len(records)),
        wall_s=wall,
        cpu_s=cpu1 - cpu0,
        rusage_user_s=user1 - user0,
        rusage_sys_s=sys1 - sys0,
        max_in_flight=config.concurrency,
    )

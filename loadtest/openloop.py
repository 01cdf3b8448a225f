"""Open-loop load on a gRPC unary method: requests leave at their scheduled times, whatever the server does.

    results = await run_open_loop(channel, requests, LoadConfig(rate=50, duration_s=15))

- The requests are built and serialized once, before the clock starts; the method is called with
  raw bytes in and raw bytes out, so the generator spends no time on protobuf per call.
- Arrival times are drawn up front (Poisson: exponential gaps; or constant spacing) for the whole
  run. Each request is fired as its own task at its scheduled time, so slow responses never delay
  later sends (no coordinated omission), and its latency is measured from the *scheduled* time: if
  the generator itself falls behind, that lag is charged to latency, never hidden. The lag is
  reported too (`send_lag_*`), so an overloaded generator is visible.
- Achieved throughput counts OK completions inside the measurement window (the sending period
  after a warm-up); a server that cannot keep up completes fewer than were offered.
- The generator's own CPU time (all threads of this process) is measured, because on a small
  machine it competes with the server for the same cores.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from loadtest.callers import open_caller

SCORE_METHOD = "/scoring.v1.Scorer/Score"
Arrival = Literal["poisson", "constant"]
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass(frozen=True)
class LoadConfig:
    rate: float  # offered requests per second
    duration_s: float  # sending period
    arrival: Arrival = "poisson"
    timeout_s: float | None = 10.0  # per-call gRPC deadline; None = wait forever
    warmup_s: float | None = None  # start of the throughput window; None = 20% of duration_s
    method: str = SCORE_METHOD
    seed: int = 0
    # Sent with every call, e.g. (("application", "scoring"),) for Ray Serve's gRPC proxy, which routes by it.
    metadata: tuple[tuple[str, str], ...] = ()
    streams: int = 4  # ScoreStream calls the items share, when `method` is loadtest.callers.STREAM_METHOD

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.duration_s <= 0:
            raise ValueError("rate and duration_s must be positive")
        if self.arrival not in ("poisson", "constant"):
            raise ValueError(f"arrival must be poisson or constant, got {self.arrival!r}")
        check_run_config(self)

    @property
    def window_start_s(self) -> float:
        return default_window_start(self.duration_s, self.warmup_s)

    def describe(self) -> dict[str, Any]:
        """The keys that lead a summary: what kind of load this was."""
        return {"rate": self.rate, "arrival": self.arrival, "mode": "open"}


class _Checked(Protocol):
    @property
    def duration_s(self) -> float: ...
    @property
    def timeout_s(self) -> float | None: ...
    @property
    def warmup_s(self) -> float | None: ...
    @property
    def metadata(self) -> tuple[tuple[str, str], ...]: ...


def check_run_config(cfg: _Checked) -> None:
    """What open- and closed-loop runs share: a positive deadline, a window inside the run, usable metadata."""
    if cfg.duration_s <= 0:
        raise ValueError("duration_s must be positive")
    if cfg.timeout_s is not None and cfg.timeout_s <= 0:
        raise ValueError("timeout_s must be positive (or None)")
    if cfg.warmup_s is not None and not 0 <= cfg.warmup_s < cfg.duration_s:
        raise ValueError("warmup_s must be in [0, duration_s)")
    for key, _ in cfg.metadata:
        # gRPC rejects upper-case keys at call time, once per request; fail here instead.
        if not key or key != key.lower():
            raise ValueError(f"metadata keys must be non-empty and lower-case, got {key!r}")


def default_window_start(duration_s: float, warmup_s: float | None) -> float:
    """The throughput window starts after `warmup_s`, or after the first 20% of the run."""
    return duration_s * 0.2 if warmup_s is None else warmup_s


def arrival_offsets(rate: float, duration_s: float, arrival: Arrival, rng: np.random.Generator) -> np.ndarray:
    """Send times in seconds from the start, ascending, all in [0, duration_s)."""
    if arrival == "constant":
        return np.arange(0.0, duration_s, 1.0 / rate)
    chunks: list[np.ndarray] = []
    last = 0.0
    expected = int(rate * duration_s) + 16
    while last < duration_s:
        times = last + np.cumsum(rng.exponential(1.0 / rate, size=expected))
        chunks.append(times)
        last = float(times[-1])
    offsets = np.concatenate(chunks)
    return offsets[offsets < duration_s]


def serialize_requests(messages: Sequence[Message]) -> list[bytes]:
    """Pre-serialized request bodies, so the timed loop does no protobuf work."""
    return [m.SerializeToString() for m in messages]


def latency_summary(latencies_s: np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99/p99.9/max/mean in milliseconds (None for an empty sample)."""
    keys = [f"p{p:g}_ms" for p in PERCENTILES] + ["max_ms", "mean_ms"]
    if latencies_s.size == 0:
        return dict.fromkeys(keys)
    ms = latencies_s * 1000.0
    values = [*np.percentile(ms, PERCENTILES).tolist(), float(ms.max()), float(ms.mean())]
    return {k: round(float(v), 3) for k, v in zip(keys, values, strict=True)}


class RunConfig(Protocol):
    """What a result needs from its run's configuration (open loop: LoadConfig; closed loop: ClosedLoopConfig)."""

    @property
    def duration_s(self) -> float: ...
    @property
    def window_start_s(self) -> float: ...
    @property
    def timeout_s(self) -> float | None: ...
    def describe(self) -> dict[str, Any]: ...


C = TypeVar("C", bound=RunConfig)


@dataclass
class RunResult(Generic[C]):
    """Per-request measurements of one run; open and closed loop share it, so their summaries match."""

    config: C
    scheduled_s: np.ndarray  # per request: send time from the start (open loop: the schedule)
    latency_s: np.ndarray  # per request: completion - scheduled send time (any status)
    completed_s: np.ndarray  # per request: completion time from the start
    codes: list[str]  # per request: gRPC status code name ("OK", "DEADLINE_EXCEEDED", ...)
    send_lag_s: np.ndarray  # per request: actual send - scheduled send (always 0 in a closed loop)
    wall_s: float  # start to the last completion
    cpu_s: float  # this process, all threads (time.process_time)
    rusage_user_s: float
    rusage_sys_s: float
    max_in_flight: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok_mask(self) -> np.ndarray:
        return np.array([c == "OK" for c in self.codes], bool)

    @property
    def ok(self) -> int:
        return int(self.ok_mask.sum())

    @property
    def failures(self) -> dict[str, int]:
        return dict(sorted(Counter(c for c in self.codes if c != "OK").items()))

    @property
    def offered_rate(self) -> float:
        """Requests actually sent per second (Poisson draws vary around the configured rate)."""
        return len(self.codes) / self.config.duration_s

    @property
    def achieved_rate(self) -> float:
        """OK completions per second inside the window [warm-up, end of sending]."""
        lo, hi = self.config.window_start_s, self.config.duration_s
        done = self.completed_s[self.ok_mask]
        return float(((done >= lo) & (done < hi)).sum()) / (hi - lo)

    @property
    def completed_rate(self) -> float:
        """OK completions per second from the start to the last completion (backlog included)."""
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    def ok_latencies(self, since_s: float = 0.0, until_s: float | None = None) -> np.ndarray:
        """Latencies of OK requests scheduled in [since_s, until_s)."""
        until = self.config.duration_s if until_s is None else until_s
        mask = self.ok_mask & (self.scheduled_s >= since_s) & (self.scheduled_s < until)
        return self.latency_s[mask]

    def summary(self) -> dict[str, Any]:
        """JSON-friendly numbers; latencies in ms."""
        cfg = self.config
        third = (cfg.duration_s - cfg.window_start_s) / 3.0
        early = self.ok_latencies(cfg.window_start_s, cfg.window_start_s + third)
        late = self.ok_latencies(cfg.duration_s - third)
        lag = latency_summary(self.send_lag_s)
        cores = round(self.cpu_s / self.wall_s, 4) if self.wall_s > 0 else None
        return {
            **cfg.describe(),
            "duration_s": cfg.duration_s,
            "window_start_s": cfg.window_start_s,
            "timeout_s": cfg.timeout_s,
            "scheduled": len(self.codes),
            "offered_rate": round(self.offered_rate, 3),
            "achieved_rate": round(self.achieved_rate, 3),
            "completed_rate": round(self.completed_rate, 3),
            "ok": self.ok,
            "failures": self.failures,
            "status_codes": dict(sorted(Counter(self.codes).items())),  # OK included: every call, by outcome
            "latency": latency_summary(self.ok_latencies()),
            # Failed calls are timed apart: a refusal answers at once, a deadline at the timeout; either
            # would distort the OK percentiles, but how fast failures come back matters under overload.
            "latency_failed": latency_summary(self.latency_s[~self.ok_mask]),
            "p99_early_ms": latency_summary(early)["p99_ms"],
            "p99_late_ms": latency_summary(late)["p99_ms"],
            "send_lag_p99_ms": lag["p99_ms"],
            "send_lag_max_ms": lag["max_ms"],
            "max_in_flight": self.max_in_flight,
            "wall_s": round(self.wall_s, 3),
            "generator_cpu_s": round(self.cpu_s, 3),
            "generator_cpu_user_s": round(self.rusage_user_s, 3),
            "generator_cpu_sys_s": round(self.rusage_sys_s, 3),
            "generator_cpu_util": cores,  # kept for older readers; the same number as generator_cpu_cores
            "generator_cpu_cores": cores,  # CPU seconds per wall second: 1.0 = one core busy
            **self.extra,
        }


class LoadResult(RunResult[LoadConfig]):
    """The result of `run_open_loop`."""


def rusage_self() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


async def run_open_loop(channel: grpc.aio.Channel, requests: Sequence[bytes], config: LoadConfig, *,
                        on_progress: Callable[[float], None] | None = None) -> LoadResult:
    """Offers `config.rate` calls per second for `config.duration_s`, then waits for every answer.

    `requests` are serialized request messages; call i sends a seeded random pick among them.
    `on_progress(fraction_sent)` is called about once a second while sending.
    """
    if not requests:
        raise ValueError("no requests to send")
    rng = np.random.default_rng(config.seed)
    offsets = arrival_offsets(config.rate, config.duration_s, config.arrival, rng)
    picks = rng.integers(0, len(requests), size=len(offsets))
    n = len(offsets)
    latency = np.full(n, np.nan)
    completed = np.full(n, np.nan)
    lag = np.zeros(n)
    codes = ["" for _ in range(n)]
    send, close = open_caller(channel, config.method, config.timeout_s, config.metadata, config.streams)
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    in_flight = 0
    max_in_flight = 0

    async def one(i: int, due: float, start: float) -> None:
        nonlocal in_flight
        try:
            codes[i] = await send(requests[picks[i]])
        except Exception as exc:  # a generator-side failure must still be counted
            codes[i] = f"CLIENT_{type(exc).__name__}"
        finally:
            now = time.perf_counter()
            latency[i] = now - due
            completed[i] = now - start
            in_flight -= 1

    cpu0, (user0, sys0) = time.process_time(), rusage_self()
    start = time.perf_counter() + 0.01
    next_report = 1.0
    for i, offset in enumerate(offsets.tolist()):
        due = start + offset
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lag[i] = time.perf_counter() - due
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        task = loop.create_task(one(i, due, start))
        pending.add(task)
        task.add_done_callback(pending.discard)
        if on_progress is not None and offset >= next_report:
            on_progress(offset / config.duration_s)
            next_report = offset + 1.0
    if n == 0:  # nothing drawn (a very low rate for a short time): the run still lasts its sending period
        await asyncio.sleep(max(0.0, start + config.duration_s - time.perf_counter()))
    if pending:
        await asyncio.gather(*pending)
    await close()
    wall = time.perf_counter() - start
    cpu1, (user1, sys1) = time.process_time(), rusage_self()
    if on_progress is not None:
        on_progress(1.0)
    return LoadResult(
        config=config,
        scheduled_s=offsets,
        latency_s=latency,
        completed_s=completed,
        codes=codes,
        send_lag_s=np.maximum(lag, 0.0),
        wall_s=wall,
        cpu_s=cpu1 - cpu0,
        rusage_user_s=user1 - user0,
        rusage_sys_s=sys1 - sys0,
        max_in_flight=max_in_flight,
    )

"""Dynamic batching onto one engine: a bounded queue owned by one task, grouped by length.

Shape of the loop (after text-embeddings-inference's queue/infer split):
- `submit` admits items or refuses at once (no waiting for room) when the queue holds
  `max_queue_size` items, or more than `max_queue_wait_ms` of engine work (estimated from the
  batches just run), or more work than the call's deadline leaves time for, or, under overload (a
  standing queue fed faster than full batches drain it), more than `queue_target_ms` (below): the
  excess is refused in microseconds instead of expiring in the queue, and what is admitted waits a
  bounded time;
- one dispatcher task owns the queue: it waits until the engine is free or a full batch is
  queued (and, when the engine is idle, at most `max_queue_delay_ms` for more arrivals), drops
  items whose client went away or whose deadline passed, and builds a batch around the oldest
  item from its neighbours in length (see `BatchCost`), within `max_batch_size`,
  `max_batch_tokens` and, under a standing queue, an estimated run time of `queue_target_ms`;
- the padded batch is prepared while the previous one still runs; up to `lanes` batches run at
  once, each on its own thread (on the CPU, one single-threaded run per core: runtime.ModelRuntime).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from model_format.features import EncodedRequest, pad_batch

log = logging.getLogger(__name__)

RunFn = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, float]]  # scores [B, N], compute seconds


class QueueFull(Exception):
    """The queue cannot take these items now."""


class DeadlineExpired(Exception):
    """The item's deadline passed before it reached the engine; it was not computed."""


class BatcherClosed(Exception):
    """The batcher is draining or stopped and takes no new items."""


class EngineFailed(Exception):
    """The engine raised on the batch this item was in."""


# Measured on the demo model (BENCHMARKS.md, raw engine by batch size, one single-threaded run per
# core): fp32 and int8 throughput peak at batch 8 (fp32 85.3/s vs 84.8 at 16 on a 2-vCPU AMD EPYC,
# 134.9 vs 123.0 on an Intel Xeon), while a GPU needs wide batches to fill.
CPU_MAX_BATCH_SIZE = 8
GPU_MAX_BATCH_SIZE = 64
# Fixed cost of one engine run, in padded-token equivalents: fitted to `make bench`'s raw engine
# table (batch 1 vs batch 16, length-grouped) on a 2-core Intel Xeon: ~3 ms per run against ~0.12 ms
# per token. On a GPU a run's fixed cost dominates, so batches are filled regardless (not measured).
CPU_BATCH_OVERHEAD_TOKENS = 24
GPU_BATCH_OVERHEAD_TOKENS = 4096


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 0  # 0 = by device: CPU_MAX_BATCH_SIZE or GPU_MAX_BATCH_SIZE
    max_batch_tokens: int = 8192  # batch size x padded length
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 1024  # items waiting, not counting the batch on the engine
    max_queue_wait_ms: float = 1000.0  # estimated engine time queued before refusing (0 = no time bounds)
    # CoDel's idea applied to admission: a burst may queue up to max_queue_wait_ms, but once batches
    # have left after waiting more than standing_wait_ms for queue_interval_ms on end, while more
    # work arrived over the last ENTRY_WINDOWS intervals than the lanes run at full batches (overload,
    # not a burst, nor the long waits of eager small batches near capacity), new items are admitted
    # only while the queue holds less than queue_target_ms of work. Admitted calls then wait about the target
    # instead of the hard bound. Nor is a batch then planned to run longer than the target (see
    # `_batch_tokens`), so a call admitted under overload takes about twice the target.
    queue_target_ms: float = 80.0
    standing_wait_ms: float = 200.0
    queue_interval_ms: float = 1000.0
    batch_overhead_tokens: int = 0  # 0 = by device; see BatchCost

    def __post_init__(self) -> None:
        if self.max_batch_size < 0 or self.max_queue_size < 1 or self.max_batch_tokens < 1:
            raise ValueError("batch size must not be negative; queue size and token budget must be positive")
        if min(self.max_queue_delay_ms, self.max_queue_wait_ms, self.batch_overhead_tokens, self.queue_target_ms,
               self.standing_wait_ms, self.queue_interval_ms) < 0:
            raise ValueError("max_queue_delay_ms, max_queue_wait_ms, queue_target_ms, standing_wait_ms, "
                             "queue_interval_ms and batch_overhead_tokens must not be negative")

    def for_device(self, on_gpu: bool) -> BatcherConfig:
        """Fills the by-device defaults (0) for the engine this batcher will feed."""
        return replace(
            self,
            max_batch_size=self.max_batch_size or (GPU_MAX_BATCH_SIZE if on_gpu else CPU_MAX_BATCH_SIZE),
            batch_overhead_tokens=self.batch_overhead_tokens
            or (GPU_BATCH_OVERHEAD_TOKENS if on_gpu else CPU_BATCH_OVERHEAD_TOKENS),
        )


# The optimal split is computed over at most this many queued items nearest the oldest in length:
# O(window x max_batch_size) Python steps per batch. A queue bounded by `max_queue_wait_ms` rarely
# holds more.
PLAN_WINDOW = 256


@dataclass(frozen=True, slots=True)
class BatchCost:
    """Engine time of a padded batch, in token units: `overhead + size x padded_length`.

    On the CPU a padded token costs as much as a real one, and every run has a fixed cost, so the
    batcher splits the queue (sorted by length) into the batches of least total cost and runs the
    one that holds the oldest item: a 10-token query is not padded to 100 tokens, and lengths that
    are alike share one run.
    """

    overhead: int

    def total(self, size: int, padded_length: int) -> int:
        return self.overhead + size * padded_length

    def plan(self, lengths: Sequence[int], max_size: int, max_tokens: int) -> list[tuple[int, int]]:
        """Splits ascending `lengths` into contiguous [start, end) groups of least total cost."""
        n = len(lengths)
        best = [0.0] + [math.inf] * n
        cut = [0] * (n + 1)
        for end in range(1, n + 1):
            longest = lengths[end - 1]
            for start in range(end - 1, max(0, end - max_size) - 1, -1):
                size = end - start
                if size > 1 and size * longest > max_tokens:
                    break
                cost = best[start] + self.overhead + size * longest
                if cost < best[end]:
                    best[end], cut[end] = cost, start
        groups = []
        end = n
        while end > 0:
            groups.append((cut[end], end))
            end = cut[end]
        return groups[::-1]


@dataclass(frozen=True)
class BatchStats:
    size: int
    padded_length: int
    real_tokens: int
    queue_wait_seconds: tuple[float, ...]
    inference_seconds: float
    scores: np.ndarray  # [size, N]

    @property
    def padding_ratio(self) -> float:
        padded = self.size * self.padded_length
        return 1.0 - self.real_tokens / padded if padded else 0.0


def _no_stats(_stats: BatchStats) -> None:
    return None


ENTRY_WINDOWS = 3  # whole intervals the offered load is averaged over before an overload is declared


@dataclass(slots=True)
class _ArrivalWindow:
    """Cost units of arriving items in tumbling windows of one interval: the current window's and
    the last whole ones' (newest first)."""

    start: float | None = None
    units: float = 0.0
    done: list[tuple[float, float]] = field(default_factory=list)  # (units, seconds)

    def _closed(self, now: float, interval: float) -> list[tuple[float, float]]:
        """The whole windows as of `now`, without changing anything."""
        if interval <= 0:
            return []  # no window: the standing-queue rule is off
        if self.start is None or now - self.start < interval:
            return self.done
        if now - self.start >= 2 * interval:  # quiet windows passed with nothing in them
            quiet = min(ENTRY_WINDOWS, int((now - self.start) / interval) - 1)
            return [*[(0.0, interval)] * quiet, (self.units, interval), *self.done][:ENTRY_WINDOWS]
        return [(self.units, now - self.start), *self.done][:ENTRY_WINDOWS]

    def add(self, now: float, interval: float, units: float) -> None:
        if self.start is None or now - self.start >= interval:
            self.done = self._closed(now, interval)
            self.start, self.units = now, 0.0
        self.units += units

    def last(self, now: float, interval: float, windows: int = 1) -> tuple[float, float]:
        """Units and seconds of the last `windows` whole windows. Reads only: the metrics endpoint
        calls this from its own thread."""
        recent = self._closed(now, interval)[:windows]
        return sum(u for u, _ in recent), sum(t for _, t in recent)


@dataclass(eq=False, slots=True)
class _Pending:
    item: EncodedRequest
    future: asyncio.Future[np.ndarray]
    deadline: float | None  # event-loop clock
    enqueued: float = field(default=0.0)


class Batcher:
    def __init__(
        self,
        run: RunFn,
        config: BatcherConfig,
        *,
        name: str = "batcher",
        on_batch: Callable[[BatchStats], None] = _no_stats,
        lanes: int = 1,
    ) -> None:
        if config.max_batch_size == 0 or config.batch_overhead_tokens == 0:
            config = config.for_device(on_gpu=False)
        self.config = config
        self.cost = BatchCost(config.batch_overhead_tokens)
        self.name = name
        self._run = run
        self._on_batch = on_batch
        self._queue: list[_Pending] = []
        self._changed = asyncio.Event()
        self.lanes = max(1, lanes)
        self._running = 0  # batches on the engine
        self._running_work: dict[int, tuple[float, int]] = {}  # per running batch: start, cost units
        self._overloaded = False  # a standing queue: admission holds the queue at queue_target_ms
        self._long_since: float | None = None  # every batch since then left after waiting > standing_wait_ms
        self._overload_since = 0.0
        self._last_refusal = 0.0  # when the standing-queue rule last refused (event-loop clock)
        self._arrivals = _ArrivalWindow()
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=self.lanes, thread_name_prefix=f"ort-{name}")
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.batches_run = 0
        self._seconds_per_token: float | None = None  # engine time per cost unit, smoothed over batches
        self._queued_tokens = 0

    # --- public -------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def _work_seconds(self, items: int, tokens: int, now: float) -> float | None:
        """Estimated time for the engine's lanes to run `items` queued items after what they run now;
        None until a batch has been timed."""
        if self._seconds_per_token is None:
            return None
        # Under a standing queue batches are cut to the target's run time: more of them, more overhead.
        batches = max(math.ceil(items / self.config.max_batch_size), math.ceil(tokens / self._batch_tokens()))
        queued = (tokens + batches * self.cost.overhead) * self._seconds_per_token
        # A full batch on one thread runs for hundreds of ms: what is left of the running ones counts.
        running = sum(max(0.0, units * self._seconds_per_token - (now - started))
                      for started, units in self._running_work.values())
        return (queued + running) / self.lanes

    def _note_wait(self, oldest_wait: float, now: float) -> None:
        """Called as a batch leaves the queue, with the wait of its oldest item. An overload starts
        after every leaving batch waited over `standing_wait_ms` for `queue_interval_ms` (a batch that
        empties the queue while no other runs voids that evidence: the engine caught up). It ends
        when the rule has not had to refuse anything for as long (`_end_quiet_overload`): held at
        the target, waits stay short by construction, so they cannot be the signal, and an emptied
        queue under overload is only the dispatcher taking all of a short queue at once."""
        if self.config.max_queue_wait_ms <= 0:
            return  # time bounds off: no standing-queue rule either
        interval = self.config.queue_interval_ms / 1000.0
        if self._overloaded:
            self._end_quiet_overload(now)
        elif oldest_wait * 1000.0 <= self.config.standing_wait_ms or (not self._queue and self._running == 0):
            self._long_since = None
        elif self._long_since is None:
            self._long_since = now
        elif now - self._long_since >= interval and self.offered_load(now, ENTRY_WINDOWS) >= 1.0:
            self._set_overloaded(True, now)

    def offered_load(self, now: float, windows: int = 1) -> float:
        """Work that arrived (admitted or refused) in the last `windows` whole `queue_interval_ms`, as
        a share of what the lanes run in that time at full batches; 0 until a batch has been timed.
        Under 1, long waits are eager small batches near capacity, which grow by themselves as the
        queue does: refusing then would turn away calls the engine has time for. An overload is
        declared on the average of ENTRY_WINDOWS intervals (one interval of Poisson arrivals near
        capacity often reads over 1) and lets go on the last one."""
        if self._seconds_per_token is None:
            return 0.0
        units, seconds = self._arrivals.last(now, self.config.queue_interval_ms / 1000.0, windows)
        return units * self._seconds_per_token / (seconds * self.lanes) if seconds > 0 else 0.0

    def _end_quiet_overload(self, now: float) -> None:
        """Overload ends once the rule has refused nothing for an interval, or the last interval's
        arrivals fit the engine at full batches (near capacity the hold refuses now and then
        without an overload: it would never go quiet)."""
        if not self._overloaded:
            return
        interval = self.config.queue_interval_ms / 1000.0
        if now - self._last_refusal >= interval or (
                now - self._overload_since >= interval and self.offered_load(now) < 1.0):
            self._set_overloaded(False, now)

    def _set_overloaded(self, overloaded: bool, now: float) -> None:
        self._long_since = None
        self._last_refusal = now  # a fresh overload lasts at least one interval
        self._overload_since = now
        if overloaded != self._overloaded:
            self._overloaded = overloaded
            log.info("standing queue" if overloaded else "standing queue gone",
                     extra={"event": "queue_overloaded" if overloaded else "queue_recovered", "batcher": self.name})

    @property
    def overloaded(self) -> bool:
        """The standing-queue rule holds admission at `queue_target_ms`."""
        return self._overloaded

    @property
    def idle(self) -> bool:
        return not self._queue and self._running == 0

    def start(self) -> None:
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._dispatch_loop(), name=f"{self.name}-dispatch")

    def current_offered_load(self) -> float:
        """`offered_load` now, for the metrics endpoint (on its own thread; reads only)."""
        return self.offered_load(self._loop.time()) if self._loop is not None else 0.0

    def submit(
        self, items: Sequence[EncodedRequest], deadline: float | None = None
    ) -> list[asyncio.Future[np.ndarray]]:
        """Admits all items or none. Each future resolves to that item's score row [N]."""
        if self._closed:
            raise BatcherClosed(f"{self.name} is draining")
        cfg = self.config
        if len(self._queue) + len(items) > cfg.max_queue_size:
            raise QueueFull(
                f"queue holds {len(self._queue)} of {cfg.max_queue_size} items; {len(items)} more do not fit"
            )
        tokens = sum(it.length for it in items)
        loop = asyncio.get_running_loop()
        now = loop.time()
        # Refused work counts too: the offered load, not what admission let through.
        self._arrivals.add(now, cfg.queue_interval_ms / 1000.0,
                           tokens + len(items) * self.cost.overhead / cfg.max_batch_size)
        if cfg.max_queue_wait_ms > 0 and self._queue:  # an empty queue always admits: no starvation
            work = self._work_seconds(len(self._queue) + len(items), self._queued_tokens + tokens, now)
            if work is not None and work * 1000.0 > cfg.max_queue_wait_ms:
                raise QueueFull(
                    f"queue holds ~{work * 1000.0:.0f} ms of engine work with these items, over "
                    f"max_queue_wait_ms {cfg.max_queue_wait_ms:.0f}"
                )
            self._end_quiet_overload(now)
            if work is not None and work * 1000.0 > cfg.queue_target_ms and self._overloaded:
                self._last_refusal = now
                raise QueueFull(
                    f"overloaded: batches have waited over {cfg.standing_wait_ms:.0f} ms for "
                    f"{cfg.queue_interval_ms:.0f} ms on end, and the queue holds ~{work * 1000.0:.0f} ms "
                    f"of engine work with these items, over the {cfg.queue_target_ms:.0f} ms target"
                )
            if work is not None and deadline is not None and now + work > deadline:
                # It would expire in the queue: say so now, while the client can still go elsewhere.
                raise QueueFull(
                    f"queue holds ~{work * 1000.0:.0f} ms of engine work with these items; the call's deadline "
                    f"leaves {max(0.0, deadline - now) * 1000.0:.0f} ms"
                )
        futures = []
        for item in items:
            fut: asyncio.Future[np.ndarray] = loop.create_future()
            self._queue.append(_Pending(item, fut, deadline, now))
            futures.append(fut)
        self._queued_tokens += tokens
        self._changed.set()
        return futures

    async def close(self) -> None:
        """Stops admission, lets queued and running items finish, then stops the dispatcher."""
        self._closed = True
        self._changed.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    # --- dispatcher -----------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._queue:
                    if self._closed:
                        break
                    await self._wait_change(None)
                    continue
                if not await self._batch_ready(loop):
                    continue
                batch = self._take_batch(loop.time())
                if not batch:
                    continue
                inputs = pad_batch([p.item for p in batch])
                while self._running >= self.lanes:  # the next batch is ready; wait for a lane
                    await self._wait_change(None)
                now = loop.time()
                batch, inputs = self._recheck(batch, inputs, now)
                if batch:
                    self._note_wait(max(now - p.enqueued for p in batch), now)
                    self._running += 1
                    task = loop.create_task(self._execute(batch, inputs))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
            if self._inflight:
                await asyncio.gather(*self._inflight)
        except asyncio.CancelledError:
            self._fail_all(BatcherClosed(f"{self.name} stopped"))
            raise

    async def _wait_change(self, timeout: float | None) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()

    async def _batch_ready(self, loop: asyncio.AbstractEventLoop) -> bool:
        """True when a batch should be formed now; False after waiting for something to change."""
        if len(self._queue) >= self.config.max_batch_size:
            return True  # a full batch is prepared even while the engine still runs the last one
        if self._running >= self.lanes:
            # Partial batch while every lane works: keep collecting until one is free.
            await self._wait_change(None)
            return False
        if self._closed:
            return True
        remaining = self._queue[0].enqueued + self.config.max_queue_delay_ms / 1000.0 - loop.time()
        if remaining <= 0:
            return True
        await self._wait_change(remaining)
        return False

    def _drop_dead(self, now: float) -> None:
        live = []
        for p in self._queue:
            if p.future.done():  # cancelled by the caller: the client went away
                continue
            if p.deadline is not None and p.deadline <= now:
                p.future.set_exception(DeadlineExpired("deadline passed while queued"))
                continue
            live.append(p)
        self._set_queue(live)

    def _set_queue(self, queue: list[_Pending]) -> None:
        self._queue = queue
        self._queued_tokens = sum(p.item.length for p in queue)

    def _take_batch(self, now: float) -> list[_Pending]:
        self._drop_dead(now)
        if not self._queue:
            return []
        cfg = self.config
        queue = self._queue
        # The oldest item always goes next (no starvation), with the items that the cheapest split
        # of the queue puts in its batch.
        order = sorted(range(len(queue)), key=lambda i: (queue[i].item.length, i))
        pos = order.index(0)
        lo = max(0, min(pos - PLAN_WINDOW // 2, len(order) - PLAN_WINDOW))
        window = order[lo : lo + PLAN_WINDOW]
        groups = self.cost.plan([queue[i].item.length for i in window], cfg.max_batch_size, self._batch_tokens())
        start, end = next((a, b) for a, b in groups if a <= pos - lo < b)
        chosen = set(window[start:end])
        batch = [queue[i] for i in sorted(chosen)]
        self._set_queue([p for i, p in enumerate(queue) if i not in chosen])
        return batch

    def _batch_tokens(self) -> int:
        """The token budget of the next batch: `max_batch_tokens`, and, under a standing queue, no
        more than runs within `queue_target_ms`: one CPU thread runs a batch of 8 real pairs for longer
        than the target, so a call admitted at the target would otherwise run for longer than it waited.
        Outside overload batches stay as wide as throughput wants: a burst drains fastest that way."""
        cfg = self.config
        if not self._overloaded or cfg.queue_target_ms <= 0 or self._seconds_per_token is None:
            return cfg.max_batch_tokens
        units = cfg.queue_target_ms / 1000.0 / self._seconds_per_token
        return max(1, min(cfg.max_batch_tokens, int(units) - self.cost.overhead))

    def _recheck(
        self, batch: list[_Pending], inputs: dict[str, np.ndarray], now: float
    ) -> tuple[list[_Pending], dict[str, np.ndarray]]:
        """Drops items that died while the batch waited for the engine; re-pads only if needed."""
        live = []
        for p in batch:
            if p.future.done():
                continue
            if p.deadline is not None and p.deadline <= now:
                p.future.set_exception(DeadlineExpired("deadline passed while queued"))
                continue
            live.append(p)
        if len(live) == len(batch):
            return batch, inputs
        return live, (pad_batch([p.item for p in live]) if live else {})

    async def _execute(self, batch: list[_Pending], inputs: dict[str, np.ndarray]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        units = self.cost.total(len(batch), int(inputs["input_ids"].shape[1]))
        self._running_work[id(batch)] = (started, units)
        try:
            scores, elapsed = await loop.run_in_executor(self._executor, self._run, inputs)
        except Exception as exc:
            log.error("engine failed on a batch of %d", len(batch), exc_info=True,
                      extra={"event": "engine_error", "batcher": self.name})
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(EngineFailed(f"engine error: {type(exc).__name__}: {exc}"))
        else:
            for row, p in enumerate(batch):
                if not p.future.done():
                    p.future.set_result(scores[row])
            self.batches_run += 1
            self._observe_cost(elapsed / units)
            self._on_batch(
                BatchStats(
                    size=len(batch),
                    padded_length=int(inputs["input_ids"].shape[1]),
                    real_tokens=sum(p.item.length for p in batch),
                    queue_wait_seconds=tuple(started - p.enqueued for p in batch),
                    inference_seconds=elapsed,
                    scores=scores,
                )
            )
        finally:
            del self._running_work[id(batch)]
            self._running -= 1
            self._changed.set()

    def _observe_cost(self, seconds_per_token: float) -> None:
        # Smoothed, so one slow batch (a GC pause, a noisy neighbour) does not start refusals.
        prev = self._seconds_per_token
        self._seconds_per_token = seconds_per_token if prev is None else 0.8 * prev + 0.2 * seconds_per_token

    def _fail_all(self, exc: Exception) -> None:
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(exc)
        self._set_queue([])

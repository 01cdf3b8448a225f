"""Dynamic batching onto one engine: a bounded queue owned by one task, dispatched onto engine lanes.

Shape of the loop (after text-embeddings-inference's queue/infer split):
- `submit` admits all of a call's items or none, at once (server.admission: the item bound, the
  engine-work bound, the standing-queue target and the call's deadline);
- one dispatcher task owns the queue: it waits until the engine is free or a full batch is
  queued (and, when the engine is idle, at most `max_queue_delay_ms` for more arrivals), drops
  items whose client went away or whose deadline passed, and takes the batch that the plan
  (server.batch_plan) puts the oldest item in;
- the padded batch is prepared while the previous one still runs; up to `lanes` batches run at
  once, each on its own thread (on the CPU, one single-threaded run per core: runtime.ModelRuntime).
  Each batch's wait feeds the standing-queue detector (server.standing_queue), each run's time the
  engine-speed estimate that admission and the plan use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from model_format.features import EncodedRequest, pad_batch
from server.admission import QueueFull, admission_for
from server.batch_config import (
    CPU_BATCH_OVERHEAD_TOKENS,
    CPU_MAX_BATCH_SIZE,
    GPU_BATCH_OVERHEAD_TOKENS,
    GPU_MAX_BATCH_SIZE,
    BatcherConfig,
)

__all__ = [  # the settings, their device defaults and QueueFull are re-exported: callers import them here
    "CPU_BATCH_OVERHEAD_TOKENS", "CPU_MAX_BATCH_SIZE", "GPU_BATCH_OVERHEAD_TOKENS", "GPU_MAX_BATCH_SIZE",
    "BatchStats", "Batcher", "BatcherClosed", "BatcherConfig", "DeadlineExpired", "EngineFailed", "QueueFull",
    "RunFn",
]

log = logging.getLogger(__name__)

RunFn = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, float]]  # scores [B, N], compute seconds


class DeadlineExpired(Exception):
    """The item's deadline passed before it reached the engine; it was not computed."""


class BatcherClosed(Exception):
    """The batcher is draining or stopped and takes no new items."""


class EngineFailed(Exception):
    """The engine raised on the batch this item was in."""


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


@dataclass(eq=False, slots=True)
class _Pending:
    item: EncodedRequest
    future: asyncio.Future[np.ndarray]
    deadline: float | None  # event-loop clock
    enqueued: float = field(default=0.0)

    def dead(self, now: float) -> bool:
        """Cancelled by the caller (the client went away), or failed here because its deadline passed."""
        if self.future.done():
            return True
        if self.deadline is not None and self.deadline <= now:
            self.future.set_exception(DeadlineExpired("deadline passed while queued"))
            return True
        return False


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
        if 0 in (config.max_batch_size, config.batch_overhead_tokens, config.max_batch_tokens):
            config = config.for_device(on_gpu=False)
        self.config = config
        self.name = name
        self.lanes = max(1, lanes)
        self.admission = admission_for(config, self.lanes, name)
        self.planner = self.admission.planner  # the cost model and the next batch
        self.standing = self.admission.standing  # the overload detector
        self.speed = self.admission.speed  # engine seconds per cost unit, learnt from the batches run
        self._run = run
        self._on_batch = on_batch
        self._queue: list[_Pending] = []
        self._queued_tokens = 0
        self._changed = asyncio.Event()
        self._running = 0  # batches on the engine
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=self.lanes, thread_name_prefix=f"ort-{name}")
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start: its clock is the queue's
        self._inflight: set[asyncio.Task[None]] = set()
        self.batches_run = 0

    # --- public -------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def overloaded(self) -> bool:
        """The standing-queue rule holds admission at `queue_target_ms`."""
        return self.standing.overloaded

    @property
    def idle(self) -> bool:
        return not self._queue and self._running == 0

    def offered_load(self, now: float, windows: int = 1) -> float:
        """See StandingQueue.offered_load; `now` on the event-loop clock."""
        return self.standing.offered_load(now, windows)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the batcher runs on (the running one before `start`). Kept: on Python 3.11
        each `asyncio.get_running_loop()` is a getpid() system call."""
        return self._loop or asyncio.get_running_loop()

    def current_offered_load(self) -> float:
        """`offered_load` now, for the metrics endpoint (on its own thread; reads only)."""
        return self.offered_load(self._loop.time()) if self._loop is not None else 0.0

    def start(self) -> None:
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._dispatch_loop(), name=f"{self.name}-dispatch")

    def submit(
        self, items: Sequence[EncodedRequest], deadline: float | None = None
    ) -> list[asyncio.Future[np.ndarray]]:
        """Admits all items or none (raises QueueFull or BatcherClosed). Each future resolves to that
        item's score row [N]."""
        if self._closed:
            raise BatcherClosed(f"{self.name} is draining")
        loop = self.loop
        now = loop.time()
        tokens = sum(it.length for it in items)
        self.admission.admit(len(self._queue), self._queued_tokens, len(items), tokens, now, deadline)
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
                    self._batch_left(batch, inputs, now)
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

    def _batch_left(self, batch: list[_Pending], inputs: dict[str, np.ndarray], now: float) -> None:
        """Tells the standing-queue detector how long the batch waited and how much work stays queued,
        in the cost units its arrivals are counted in."""
        overhead = self.planner.cost.overhead
        queued = self._queued_tokens + len(self._queue) * overhead // self.config.max_batch_size
        units = self.planner.cost.total(len(batch), int(inputs["input_ids"].shape[1]))
        self.standing.batch_left(max(now - p.enqueued for p in batch), now, caught_up=self.idle,
                                 queued=queued, batch=units)

    def _set_queue(self, queue: list[_Pending]) -> None:
        self._queue = queue
        self._queued_tokens = sum(p.item.length for p in queue)

    def _take_batch(self, now: float) -> list[_Pending]:
        self._set_queue([p for p in self._queue if not p.dead(now)])
        queue = self._queue
        chosen = self.planner.next_batch([p.item.length for p in queue], self.standing.overloaded)
        if not chosen:
            return []
        taken = set(chosen)
        self._set_queue([p for i, p in enumerate(queue) if i not in taken])
        return [queue[i] for i in chosen]

    def _recheck(
        self, batch: list[_Pending], inputs: dict[str, np.ndarray], now: float
    ) -> tuple[list[_Pending], dict[str, np.ndarray]]:
        """Drops items that died while the batch waited for the engine; re-pads only if needed."""
        live = [p for p in batch if not p.dead(now)]
        if len(live) == len(batch):
            return batch, inputs
        return live, (pad_batch([p.item for p in live]) if live else {})

    async def _execute(self, batch: list[_Pending], inputs: dict[str, np.ndarray]) -> None:
        loop = self.loop
        started = loop.time()
        padded_length = int(inputs["input_ids"].shape[1])
        units = self.planner.cost.total(len(batch), padded_length)
        self.admission.started(id(batch), started, units)
        waits = tuple(started - p.enqueued for p in batch)
        real_tokens = sum(p.item.length for p in batch)
        try:
            scores, elapsed = await loop.run_in_executor(self._executor, self._run_batch, inputs, waits, real_tokens)
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
            self.speed.observe(elapsed / units)
        finally:
            self.admission.finished(id(batch))
            self._running -= 1
            self._changed.set()

    def _run_batch(self, inputs: dict[str, np.ndarray], waits: tuple[float, ...],
                   real_tokens: int) -> tuple[np.ndarray, float]:
        """On an engine lane's thread: the run, then its metrics (per batch, vectorized), so that neither
        takes the event loop's time."""
        scores, elapsed = self._run(inputs)
        try:
            self._on_batch(BatchStats(size=len(waits), padded_length=int(inputs["input_ids"].shape[1]),
                                      real_tokens=real_tokens, queue_wait_seconds=waits, inference_seconds=elapsed,
                                      scores=scores))
        except Exception:  # a metrics bug must not fail the batch
            log.exception("batch metrics failed", extra={"event": "metrics_error", "batcher": self.name})
        return scores, elapsed

    def _fail_all(self, exc: Exception) -> None:
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(exc)
        self._set_queue([])

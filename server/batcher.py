"""Dynamic batching onto one engine: a bounded queue owned by one task, grouped by length.

Shape of the loop (after text-embeddings-inference's queue/infer split):
- `submit` admits items or refuses at once when the queue is full (no waiting for room);
- one dispatcher task owns the queue: it waits until the engine is free or a full batch is
  queued (and, when the engine is idle, at most `max_queue_delay_ms` for more arrivals), drops
  items whose client went away or whose deadline passed, takes the oldest item plus the waiting
  items nearest to it in length within `max_batch_size` and `max_batch_tokens`, and pads them;
- the padded batch is prepared while the previous one still runs; one batch runs at a time,
  on a dedicated thread, because the engine already uses every core.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from server.features import EncodedRequest, pad_batch

log = logging.getLogger(__name__)

RunFn = Callable[[dict[str, np.ndarray]], np.ndarray]


class QueueFull(Exception):
    """The queue cannot take these items now."""


class DeadlineExpired(Exception):
    """The item's deadline passed before it reached the engine; it was not computed."""


class BatcherClosed(Exception):
    """The batcher is draining or stopped and takes no new items."""


class EngineFailed(Exception):
    """The engine raised on the batch this item was in."""


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 64
    max_batch_tokens: int = 8192  # batch size x padded length
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 1024  # items waiting, not counting the batch on the engine

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_size < 1 or self.max_batch_tokens < 1:
            raise ValueError("batch size, queue size and token budget must be positive")
        if self.max_queue_delay_ms < 0:
            raise ValueError("max_queue_delay_ms must not be negative")


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


class Batcher:
    def __init__(
        self,
        run: RunFn,
        config: BatcherConfig,
        *,
        name: str = "batcher",
        on_batch: Callable[[BatchStats], None] = _no_stats,
    ) -> None:
        self.config = config
        self.name = name
        self._run = run
        self._on_batch = on_batch
        self._queue: list[_Pending] = []
        self._changed = asyncio.Event()
        self._engine_busy = False
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}")
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[None] | None = None
        self.batches_run = 0

    # --- public -------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._engine_busy

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._dispatch_loop(), name=f"{self.name}-dispatch")

    def submit(
        self, items: Sequence[EncodedRequest], deadline: float | None = None
    ) -> list[asyncio.Future[np.ndarray]]:
        """Admits all items or none. Each future resolves to that item's score row [N]."""
        if self._closed:
            raise BatcherClosed(f"{self.name} is draining")
        if len(self._queue) + len(items) > self.config.max_queue_size:
            raise QueueFull(
                f"queue holds {len(self._queue)} of {self.config.max_queue_size} items; {len(items)} more do not fit"
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures = []
        for item in items:
            fut: asyncio.Future[np.ndarray] = loop.create_future()
            self._queue.append(_Pending(item, fut, deadline, now))
            futures.append(fut)
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
                while self._engine_busy:  # the next batch is ready; wait for the engine
                    await self._wait_change(None)
                batch, inputs = self._recheck(batch, inputs, loop.time())
                if batch:
                    self._engine_busy = True
                    self._inflight = loop.create_task(self._execute(batch, inputs))
            if self._inflight is not None:
                await self._inflight
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
        if self._engine_busy:
            # Partial batch while the engine works: keep collecting until it is free.
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
        self._queue = live

    def _take_batch(self, now: float) -> list[_Pending]:
        self._drop_dead(now)
        if not self._queue:
            return []
        cfg = self.config
        queue = self._queue
        longest = max(p.item.length for p in queue)
        if len(queue) <= cfg.max_batch_size and len(queue) * longest <= cfg.max_batch_tokens:
            self._queue = []
            return queue
        # The oldest item always goes next (no starvation); its neighbours in length join it.
        order = sorted(range(len(queue)), key=lambda i: (queue[i].item.length, i))
        pos = order.index(0)
        anchor_len = queue[0].item.length
        lo, hi, padded = pos, pos, anchor_len
        left_open, right_open = True, True
        while hi - lo + 1 < cfg.max_batch_size and (left_open or right_open):
            left_open = left_open and lo > 0
            right_open = right_open and hi < len(order) - 1
            if not (left_open or right_open):
                break
            left_gap = anchor_len - queue[order[lo - 1]].item.length if left_open else None
            right_gap = queue[order[hi + 1]].item.length - anchor_len if right_open else None
            go_right = left_gap is None or (right_gap is not None and right_gap < left_gap)
            if go_right:
                new_len = max(padded, queue[order[hi + 1]].item.length)
                if (hi - lo + 2) * new_len > cfg.max_batch_tokens:
                    right_open = False
                    continue
                hi, padded = hi + 1, new_len
            else:
                if (hi - lo + 2) * padded > cfg.max_batch_tokens:
                    break  # a shorter item does not raise the padding; the budget is simply spent
                lo -= 1
        chosen = set(order[lo : hi + 1])
        batch = [queue[i] for i in sorted(chosen)]
        self._queue = [p for i, p in enumerate(queue) if i not in chosen]
        return batch

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
        try:
            t0 = time.perf_counter()
            scores = await loop.run_in_executor(self._executor, self._run, inputs)
            elapsed = time.perf_counter() - t0
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
            self._engine_busy = False
            self._changed.set()

    def _fail_all(self, exc: Exception) -> None:
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(exc)
        self._queue = []

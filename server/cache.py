"""Result cache and request coalescing in front of the batchers.

Key: (model, version, the exact model input): token ids and types as tokenized, site, NER and
industry ids. A new version is a different key, so a hot swap can never serve a stale score.
Value: the full score row, so a `srcids` subset is served from it too.

Coalescing: an identical item that arrives while the first one is queued or computing waits for
that result instead of entering the queue again. The engine work is shared, not the deadline: if the
first caller's deadline expires, a follower with time left queues the item again itself.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from model_format.features import EncodedRequest
from server.batcher import DeadlineExpired
from server.model import LoadedModel
from server.resources import memory_limit_bytes

CacheKey = tuple[str, int, EncodedRequest]
ENTRY_OVERHEAD_BYTES = 240  # OrderedDict slot, key tuple, array header: measured, rounded up


def default_cache_bytes() -> int:
    """2% of the memory this process may use (container limit first), at most 1 GiB."""
    return int(min(memory_limit_bytes() * 0.02, 1 << 30))


def entry_bytes(key: CacheKey, row: np.ndarray) -> int:
    item = key[2]
    ints = len(item.input_ids) + len(item.token_type_ids) + len(item.ner_ids)
    return ENTRY_OVERHEAD_BYTES + row.nbytes + 8 * ints + sys.getsizeof(key[0])


@dataclass
class CacheMetrics:
    hits: Counter
    misses: Counter
    coalesced: Counter
    evictions: Counter
    entries: Gauge
    bytes: Gauge

    @staticmethod
    def create(registry: CollectorRegistry) -> CacheMetrics:
        return CacheMetrics(
            hits=Counter("scoring_cache_hits", "Items answered from the result cache", ["model"], registry=registry),
            misses=Counter("scoring_cache_misses", "Items not in the result cache", ["model"], registry=registry),
            coalesced=Counter("scoring_cache_coalesced", "Items that waited for an identical item in flight",
                              ["model"], registry=registry),
            evictions=Counter("scoring_cache_evictions", "Entries evicted (memory bound or TTL)", registry=registry),
            entries=Gauge("scoring_cache_entries", "Entries in the result cache", registry=registry),
            bytes=Gauge("scoring_cache_bytes", "Estimated memory held by the result cache", registry=registry),
        )


@dataclass
class _Entry:
    row: np.ndarray
    size: int
    expires: float


class ResultCache:
    """LRU bounded by estimated bytes, with an optional time to live. Event loop only."""

    def __init__(self, max_bytes: int, ttl_s: float, metrics: CacheMetrics) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.metrics = metrics
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> np.ndarray | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.ttl_s and entry.expires < time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry.row

    def put(self, key: CacheKey, row: np.ndarray) -> None:
        size = entry_bytes(key, row)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key, evicted=False)
        row = row.copy()  # own the memory: a view would keep the whole batch's scores alive
        row.setflags(write=False)
        self._entries[key] = _Entry(row, size, time.monotonic() + self.ttl_s if self.ttl_s else 0.0)
        self.bytes += size
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
        self._publish()

    def _drop(self, key: Hashable, evicted: bool = True) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size
        if evicted:
            self.metrics.evictions.inc()
        self._publish()

    def _publish(self) -> None:
        self.metrics.entries.set(len(self._entries))
        self.metrics.bytes.set(self.bytes)


@dataclass
class _InFlight:
    model: LoadedModel
    future: asyncio.Future[np.ndarray]
    waiters: int = 0
    followers: list[tuple[asyncio.Future[np.ndarray], float | None]] = field(default_factory=list)


class CachingScheduler:
    """What the servicer calls instead of queueing directly: cache, then coalescing, then the batcher."""

    def __init__(self, cache: ResultCache | None, metrics: CacheMetrics | None) -> None:
        self.cache = cache
        self.metrics = metrics
        self._inflight: dict[CacheKey, _InFlight] = {}

    def submit(self, model: LoadedModel, items: Sequence[EncodedRequest],
               deadline: float | None) -> list[asyncio.Future[np.ndarray]]:
        """Synchronous like `LoadedModel.submit`: all items admitted (or answered) or none (raises)."""
        if self.cache is None:
            return model.submit(items, deadline)
        assert self.metrics is not None
        loop = model.loop
        keys = [(model.name, model.version, item) for item in items]
        results: list[asyncio.Future[np.ndarray] | None] = [None] * len(items)
        fresh: dict[CacheKey, list[int]] = {}
        following: list[int] = []
        hits = 0
        for i, key in enumerate(keys):
            row = self.cache.get(key)
            if row is not None:
                fut: asyncio.Future[np.ndarray] = loop.create_future()
                fut.set_result(row)
                results[i] = fut
                hits += 1
            elif key in self._inflight:
                following.append(i)
            else:
                fresh.setdefault(key, []).append(i)
        coalesced = len(following) + sum(len(idx) - 1 for idx in fresh.values())
        # Counted before the batcher may refuse, so the counters describe every lookup made.
        name = model.name
        self.metrics.hits.labels(name).inc(hits)
        self.metrics.misses.labels(name).inc(len(items) - hits)
        self.metrics.coalesced.labels(name).inc(coalesced)
        if fresh:
            queued = model.submit([k[2] for k in fresh], deadline)  # may raise: nothing joined yet
            for (key, idx), leader in zip(fresh.items(), queued, strict=True):
                self._lead(key, model, leader)
                for i in idx:
                    results[i] = self._follow(key, deadline)
        for i in following:  # joined only once the call is admitted: a refused call leaves no waiter behind
            results[i] = self._follow(keys[i], deadline)
        return [r for r in results if r is not None]

    def _lead(self, key: CacheKey, model: LoadedModel, leader: asyncio.Future[np.ndarray]) -> _InFlight:
        flight = self._inflight[key] = _InFlight(model, leader)
        leader.add_done_callback(functools.partial(self._settle, key))
        return flight

    def _follow(self, key: CacheKey, deadline: float | None) -> asyncio.Future[np.ndarray]:
        """A future for one caller of an in-flight item; cancelling it withdraws only this caller."""
        flight = self._inflight[key]
        flight.waiters += 1
        mine: asyncio.Future[np.ndarray] = flight.model.loop.create_future()
        flight.followers.append((mine, deadline))
        mine.add_done_callback(functools.partial(self._left, key))
        return mine

    def _left(self, key: CacheKey, mine: asyncio.Future[np.ndarray]) -> None:
        if not mine.cancelled():
            return
        flight = self._inflight.get(key)
        if flight is None:
            return
        flight.waiters -= 1
        if flight.waiters <= 0 and not flight.future.done():
            flight.future.cancel()  # nobody wants it any more: the batcher drops it before compute

    def _settle(self, key: CacheKey, leader: asyncio.Future[np.ndarray]) -> None:
        flight = self._inflight.pop(key, None)
        if flight is None:
            return
        waiting = [(f, d) for f, d in flight.followers if not f.done()]
        if leader.cancelled():
            for f, _ in waiting:
                f.cancel()
            return
        exc = leader.exception()
        if exc is None:
            row = leader.result()
            if self.cache is not None:
                self.cache.put(key, row)
            for f, _ in waiting:
                f.set_result(row)
            return
        if isinstance(exc, DeadlineExpired):
            # The first caller's deadline passed; followers with time left queue the item again.
            now = flight.model.loop.time()
            alive = [(f, d) for f, d in waiting if d is None or d > now]
            for f, d in waiting:
                if d is not None and d <= now:
                    f.set_exception(DeadlineExpired(str(exc)))
            if alive:
                self._requeue(key, flight.model, alive)
            return
        for f, _ in waiting:
            f.set_exception(exc)

    def _requeue(self, key: CacheKey, model: LoadedModel,
                 followers: list[tuple[asyncio.Future[np.ndarray], float | None]]) -> None:
        deadlines = [d for _, d in followers]
        latest = None if None in deadlines else max(d for d in deadlines if d is not None)
        try:
            (leader,) = model.submit([key[2]], latest)
        except Exception as exc:  # queue full or draining: these followers get that answer
            for f, _ in followers:
                f.set_exception(exc)
            return
        flight = self._lead(key, model, leader)
        flight.followers, flight.waiters = followers, len(followers)

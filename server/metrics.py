"""Prometheus metrics: names, labels and the cardinality budget are decided here, once.

Label values are never taken from request text: model and version are those of loaded versions
(or the fixed value `unknown`), reasons come from the closed `LostReason` set.

Series budget per replica (documented in README.md, "Metrics"):
- per model version: pv 1, lost 7 (one per reason), queue depth 1, offered load 1, standing queue 1, info 1;
- per model: 5 histograms x 16 series;
- per head: `head_trigger_total` 1 + `head_score` histogram 4 buckets + sum + count = 7,
  so 500 heads cost 3,500 series per model, whatever the traffic.
"""

from __future__ import annotations

import enum
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from server.batcher import BatchStats
from server.versions import ModelRecords, ModelState

if TYPE_CHECKING:
    from server.model import LoadedModel

UNKNOWN = "unknown"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
HEAD_SCORE_BUCKETS = (0.25, 0.5, 0.75)  # + Inf: coarse on purpose, see the budget above
_HEAD_BOUNDS = np.array(HEAD_SCORE_BUCKETS, np.float32)


class LostReason(enum.Enum):
    """Why an item got no scores. Closed set: adding a reason is a dashboard change too."""

    QUEUE_FULL = "queue_full"
    DEADLINE = "deadline"
    CANCELLED = "cancelled"
    INVALID = "invalid"
    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class _HeadAccumulator:
    """Per-model head counters kept in numpy, merged across versions by srcid."""

    def __init__(self) -> None:
        self.rows: dict[int, int] = {}
        self.triggers = np.zeros(0, np.float64)
        self.buckets = np.zeros((0, len(HEAD_SCORE_BUCKETS) + 1), np.float64)  # non-cumulative
        self.sums = np.zeros(0, np.float64)

    def rows_for(self, srcids: Sequence[int]) -> np.ndarray:
        new = [s for s in srcids if s not in self.rows]
        if new:
            for s in new:
                self.rows[s] = len(self.rows)
            grow = len(new)
            self.triggers = np.concatenate([self.triggers, np.zeros(grow)])
            self.buckets = np.concatenate([self.buckets, np.zeros((grow, self.buckets.shape[1]))])
            self.sums = np.concatenate([self.sums, np.zeros(grow)])
        return np.array([self.rows[s] for s in srcids], np.intp)


class _HeadCollector(Collector):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.models: dict[str, _HeadAccumulator] = {}

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        triggers = CounterMetricFamily("head_trigger", "Scored items whose head score reached the head's "
                                       "threshold, all versions of the model", labels=["model", "srcid"])
        scores = HistogramMetricFamily("head_score", "Distribution of each head's scores",
                                       labels=["model", "srcid"])
        with self.lock:
            for model, acc in self.models.items():
                cumulative = np.cumsum(acc.buckets, axis=1)
                for srcid, row in acc.rows.items():
                    labels = [model, str(srcid)]
                    triggers.add_metric(labels, float(acc.triggers[row]))
                    bounds = [str(b) for b in HEAD_SCORE_BUCKETS] + ["+Inf"]
                    scores.add_metric(labels, list(zip(bounds, cumulative[row].tolist(), strict=True)),
                                      float(acc.sums[row]))
        yield triggers
        yield scores


class _BulkHistogram(Collector):
    """A histogram by model fed a batch of values at once (numpy), not one `observe` per value: the
    queue waits of a batch's items are recorded with one searchsorted and one bincount."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = np.array(buckets, np.float64)
        self.lock = threading.Lock()
        self.models: dict[str, tuple[np.ndarray, list[float]]] = {}  # non-cumulative counts (+Inf last), [sum]

    def observe_many(self, model: str, values: np.ndarray) -> None:
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self.bounds) + 1)
        total = float(values.sum())
        with self.lock:
            held, sums = self.models.setdefault(model, (np.zeros(len(self.bounds) + 1, np.int64), [0.0]))
            held += counts
            sums[0] += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model"])
        labels = [*(f"{b:g}" for b in self.bounds), "+Inf"]
        with self.lock:
            for model, (counts, sums) in self.models.items():
                cumulative = np.cumsum(counts).tolist()
                family.add_metric([model], list(zip(labels, [float(c) for c in cumulative], strict=True)), sums[0])
        yield family


class VersionMetrics:
    """The metrics one loaded version writes, with its labels bound once."""

    def __init__(self, metrics: Metrics, model: str, version: int, srcids: Sequence[int],
                 thresholds: np.ndarray) -> None:
        self._m = metrics
        self.model = model
        self.version = str(version)
        self.thresholds = thresholds
        with metrics.heads.lock:
            acc = metrics.heads.models.setdefault(model, _HeadAccumulator())
            self.rows = acc.rows_for(srcids)
        self._acc = acc
        self.batch_size = metrics.batch_size.labels(model)
        self.padding = metrics.padding_ratio.labels(model)
        self.inference = metrics.inference.labels(model)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.padding.observe(stats.padding_ratio)
        self.inference.observe(stats.inference_seconds)
        self._m.queue_wait.observe_many(self.model, np.asarray(stats.queue_wait_seconds, np.float64))
        scores = stats.scores
        heads, slots = scores.shape[1], len(HEAD_SCORE_BUCKETS) + 1
        fired = (scores >= self.thresholds).sum(axis=0)
        which = np.searchsorted(_HEAD_BOUNDS, scores, side="left")  # [B, N]: each score's bucket
        counts = np.bincount((which + np.arange(heads) * slots).ravel(), minlength=heads * slots).reshape(heads, slots)
        with self._m.heads.lock:
            self._acc.triggers[self.rows] += fired
            self._acc.buckets[self.rows] += counts
            self._acc.sums[self.rows] += scores.sum(axis=0, dtype=np.float64)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.pv = Counter("model_pv", "Items received (a ScoreBatch of 10 counts 10)", ["model", "version"],
                          registry=r)
        self.lost = Counter("model_lost", "Items that got no scores, by reason", ["model", "version", "reason"],
                            registry=r)
        self.request_latency = Histogram("scoring_request_duration_seconds",
                                         "End-to-end server time of a Score/ScoreBatch call", ["model", "method"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = _BulkHistogram("scoring_queue_wait_seconds", "Time an item waited for its batch to start",
                                         LATENCY_BUCKETS)
        r.register(self.queue_wait)
        self.inference = Histogram("scoring_inference_duration_seconds", "Engine time per batch", ["model"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("scoring_batch_size", "Items per engine batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.padding_ratio = Histogram("scoring_batch_padding_ratio", "Share of padding tokens in a batch",
                                       ["model"], buckets=RATIO_BUCKETS, registry=r)
        self.queue_depth = Gauge("scoring_queue_depth", "Items waiting for a batch", ["model", "version"],
                                 registry=r)
        self.offered_load = Gauge("scoring_offered_load",
                                  "Engine work that arrived in the last --queue-interval-ms, refused calls included, "
                                  "as a share of what the lanes run at full batches: near 1 is capacity",
                                  ["model", "version"], registry=r)
        self.standing_queue = Gauge("scoring_standing_queue",
                                    "1 while overload holds admission at --queue-target-ms (calls over it are refused)",
                                    ["model", "version"], registry=r)
        self.engine_lanes = Gauge("scoring_engine_lanes",
                                  "Batches a loaded version's engine runs at once; engine utilisation is "
                                  "rate(scoring_inference_duration_seconds_sum) / this", ["model", "version"],
                                  registry=r)
        self.model_info = Gauge("scoring_model_info", "Loaded model versions (value 1) with their properties",
                                ["model", "version", "heads", "precision", "execution_provider", "state"],
                                registry=r)
        self.model_loads = Counter("scoring_model_loads", "Version load attempts by outcome",
                                   ["model", "outcome"], registry=r)
        self.model_swaps = Counter("scoring_model_swaps", "Serving-version switches by outcome",
                                   ["model", "outcome"], registry=r)
        self.last_swap = Gauge("scoring_model_last_swap_timestamp_seconds",
                               "Unix time of the last successful serving-version switch", ["model"], registry=r)
        self.heads = _HeadCollector()
        r.register(self.heads)
        self._pv: dict[tuple[str, str], Counter] = {}
        self._latency: dict[tuple[str, str], Histogram] = {}

    def for_version(self, model: str, version: int, srcids: Sequence[int], thresholds: np.ndarray) -> VersionMetrics:
        return VersionMetrics(self, model, version, srcids, thresholds)

    # The labelled children are looked up once: `labels()` costs microseconds on every call otherwise.
    def count_pv(self, model: str, version: str, n: int = 1) -> None:
        child = self._pv.get((model, version))
        if child is None:
            child = self._pv[(model, version)] = self.pv.labels(model, version)
        child.inc(n)

    def count_lost(self, model: str, version: str, reason: LostReason, n: int = 1) -> None:
        self.lost.labels(model, version, reason.value).inc(n)

    def observe_latency(self, model: str, method: str, seconds: float) -> None:
        child = self._latency.get((model, method))
        if child is None:
            child = self._latency[(model, method)] = self.request_latency.labels(model, method)
        child.observe(seconds)

    def init_version(self, model: str, version: int) -> None:
        """Creates a version's pv and lost series at zero so rate() sees the first increase."""
        v = str(version)
        self.pv.labels(model, v)
        for reason in LostReason:
            self.lost.labels(model, v, reason.value)

    def publish_versions(self, models: Mapping[str, ModelRecords]) -> None:
        """The manager's change listener: rebuilds the per-version gauges from its records."""
        self.model_info.clear()
        self.queue_depth.clear()  # an unloaded version's series goes, and with it any hold on its engine
        self.offered_load.clear()
        self.standing_queue.clear()
        self.engine_lanes.clear()
        for name, records in models.items():
            for version, r in records.versions.items():
                if r.loaded is not None or r.state is ModelState.FAILED:
                    info = r.loaded.info() if r.loaded else None
                    self.model_info.labels(name, str(version), str(len(info.heads)) if info else "0",
                                           info.precision if info else "", info.provider if info else "",
                                           r.state.value).set(1)
                if r.loaded is not None:
                    labels = (name, str(version))
                    self.queue_depth.labels(*labels).set_function(_read(r.loaded, lambda m: m.queue_depth))
                    self.offered_load.labels(*labels).set_function(_read(r.loaded, lambda m: m.offered_load()))
                    self.standing_queue.labels(*labels).set_function(_read(r.loaded, lambda m: m.overloaded))
                    self.engine_lanes.labels(*labels).set(r.loaded.info().lanes)


def _read(model: LoadedModel, value: Callable[[LoadedModel], float]) -> Callable[[], float]:
    # A weak reference: a metrics callback must never keep an unloaded version's engine alive.
    ref = weakref.ref(model)

    def read() -> float:
        loaded = ref()
        return float(value(loaded)) if loaded is not None else 0.0

    return read

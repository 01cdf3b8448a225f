"""The batch-at-once metrics write what one `observe` per value would: queue waits and per-head counts."""

from __future__ import annotations

import itertools

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from server.batcher import BatchStats
from server.metrics import HEAD_SCORE_BUCKETS, LATENCY_BUCKETS, Metrics


def _lines(registry: CollectorRegistry, prefix: str) -> list[str]:
    return sorted(line for line in generate_latest(registry).decode().splitlines()
                  if line.startswith(prefix) and "_created" not in line)


def test_queue_waits_observed_at_once_expose_like_one_observe_each() -> None:
    rng = np.random.default_rng(0)
    waits = np.concatenate([rng.exponential(0.05, 500), [0.001, 0.0025, 10.24, 99.0, 0.0]])
    metrics = Metrics()
    reference = CollectorRegistry()
    one_by_one = Histogram("scoring_queue_wait_seconds", "Time an item waited for its batch to start", ["model"],
                           buckets=LATENCY_BUCKETS, registry=reference)
    for chunk in np.array_split(waits, 7):
        metrics.queue_wait.observe_many("demo", chunk)
    for w in waits:
        one_by_one.labels("demo").observe(float(w))
    got, want = _lines(metrics.registry, "scoring_queue_wait_seconds"), _lines(reference, "scoring_queue_wait_seconds")
    assert [line.rsplit(" ", 1)[0] for line in got] == [line.rsplit(" ", 1)[0] for line in want]
    for g, w in zip(got, want, strict=True):
        mine, theirs = float(g.rsplit(" ", 1)[1]), float(w.rsplit(" ", 1)[1])
        assert abs(mine - theirs) <= 1e-9 * max(1.0, theirs)


def test_head_counts_of_a_batch_match_a_per_score_count() -> None:
    rng = np.random.default_rng(1)
    srcids, thresholds = [11, 22, 33, 44], np.array([0.5, 0.2, 0.9, 0.75], np.float32)
    scores = rng.random((40, 4)).astype(np.float32)
    scores[0] = [0.25, 0.5, 0.75, 1.0]  # on the bucket bounds
    metrics = Metrics()
    version = metrics.for_version("demo", 1, srcids, thresholds)
    version.observe_batch(BatchStats(size=40, padded_length=8, real_tokens=300, queue_wait_seconds=(0.01,) * 40,
                                     inference_seconds=0.02, scores=scores))
    acc = metrics.heads.models["demo"]
    for col, srcid in enumerate(srcids):
        row = acc.rows[srcid]
        column = scores[:, col]
        assert acc.triggers[row] == (column >= thresholds[col]).sum()
        edges = [-np.inf, *HEAD_SCORE_BUCKETS, np.inf]
        want = [((column > lo) & (column <= hi)).sum() for lo, hi in itertools.pairwise(edges)]
        assert acc.buckets[row].tolist() == want
        assert acc.sums[row] == np.float64(column.astype(np.float64).sum())

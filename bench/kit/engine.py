"""The raw ONNX Runtime engine: fp32/int8 agreement and its throughput (the limit a server is held to).

Sessions are made with the server's options (`server.runtime`): full graph optimization, sequential
execution, `intra_op_num_threads` threads. Inputs come from `model_format.features.FeatureEncoder` and
`pad_batch`, exactly as the server builds them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from scipy.stats import spearmanr

from bench.kit.data import load_pairs
from bench.kit.machine import CpuMonitor
from loadtest.openloop import serialize_requests
from model_format.features import EncodedRequest, FeatureEncoder, FeatureError, pad_batch
from model_format.manifest import Manifest

Batch = dict[str, np.ndarray]


@dataclass
class Engine:
    precision: str
    session: ort.InferenceSession
    load_seconds: float
    threads: int = 1  # intra-op threads per run
    lanes: int = 1  # runs at once on the one session, as the server's batcher runs them

    def run(self, inputs: Batch) -> np.ndarray:
        scores: np.ndarray = self.session.run(["scores"], inputs)[0]
        return scores


def load_engine(version_dir: Path, manifest: Manifest, precision: str, threads: int, lanes: int = 1) -> Engine:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(version_dir / manifest.precisions[precision]), so,
                                   providers=["CPUExecutionProvider"])
    return Engine(precision, session, time.perf_counter() - t0, threads, lanes)


@dataclass(frozen=True)
class Encoded:
    items: list[EncodedRequest]  # engine inputs
    requests: list[bytes]  # the same pairs as serialized ScoreRequests, for a server
    source: str
    real: bool


def encode_pairs(version_dir: Path, manifest: Manifest, data: Path | None) -> Encoded:
    """The pairs of `data` (`bench.kit.data.load_pairs`) that the model can encode: a pair with no tokens would
    be refused by any server, a failure that is not the server's."""
    from scoring.v1 import scoring_pb2

    pairs, encoder = load_pairs(data), FeatureEncoder(version_dir, manifest)
    items, messages = [], []
    for p in pairs.pairs:
        try:
            items.append(encoder.encode(p.query, p.title or None))
        except FeatureError:
            continue
        messages.append(scoring_pb2.ScoreRequest(query=p.query, title=p.title or None))
    source = pairs.source if pairs.real else "synthetic (the real pairs file is absent)"
    return Encoded(items, serialize_requests(messages), source, pairs.real)


def length_grouped(items: Sequence[EncodedRequest], batch_size: int) -> list[list[EncodedRequest]]:
    """Items sorted by length and cut into batches: the least padding a batcher could achieve."""
    ordered = sorted(items, key=lambda it: it.length)
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def arrival_order(items: Sequence[EncodedRequest], batch_size: int) -> list[list[EncodedRequest]]:
    """Items in the order given (random arrivals), cut into batches: what a FIFO batcher builds."""
    return [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def padding_ratio(batches: Sequence[Batch]) -> float:
    padded = sum(b["attention_mask"].size for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return 1.0 - real / padded if padded else 0.0


def score_all(engine: Engine, items: Sequence[EncodedRequest], batch_size: int = 32) -> np.ndarray:
    """Scores [len(items), N] in the order of `items`, computed in length-grouped batches."""
    order = sorted(range(len(items)), key=lambda i: items[i].length)
    out: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        scores = engine.run(pad_batch([items[i] for i in idx]))
        if out is None:
            out = np.zeros((len(items), scores.shape[1]), np.float32)
        out[idx] = scores
    assert out is not None
    return out


def agreement(fp32: Engine, int8: Engine, items: Sequence[EncodedRequest], golden_tolerance: float | None
              ) -> dict[str, Any]:
    """Per-head Spearman correlation and absolute differences of int8 against fp32 on the same inputs."""
    t0 = time.perf_counter()
    a = score_all(fp32, items)
    b = score_all(int8, items)
    rhos = []
    for j in range(a.shape[1]):
        rho = float(spearmanr(a[:, j], b[:, j]).statistic)
        rhos.append(rho if np.isfinite(rho) else float("nan"))
    rho_arr = np.array(rhos)
    diff = np.abs(a - b)
    worst = int(np.nanargmin(rho_arr))
    return {
        "pairs": len(items),
        "heads": int(a.shape[1]),
        "spearman_min": round(float(np.nanmin(rho_arr)), 5),
        "spearman_mean": round(float(np.nanmean(rho_arr)), 5),
        "spearman_median": round(float(np.nanmedian(rho_arr)), 5),
        "spearman_min_head_index": worst,
        "heads_with_constant_scores": int(np.isnan(rho_arr).sum()),
        "max_abs_diff": round(float(diff.max()), 6),
        "mean_abs_diff": round(float(diff.mean()), 6),
        "p99_abs_diff": round(float(np.percentile(diff, 99)), 6),
        "fp32_score_std_mean": round(float(a.std(axis=0).mean()), 5),
        "golden_int8_tolerance": golden_tolerance,
        "seconds": round(time.perf_counter() - t0, 2),
        "spearman_per_head": [round(r, 5) for r in rhos],
    }


@dataclass
class Workload:
    """Pre-padded batches of one shape policy, run in a shuffled order."""

    name: str
    batch_size: int
    batches: list[Batch]
    sizes: list[int]
    padding: float


def make_workload(name: str, items: Sequence[EncodedRequest], batch_size: int, grouped: bool,
                  seed: int) -> Workload:
    groups = length_grouped(items, batch_size) if grouped else arrival_order(items, batch_size)
    groups = [g for g in groups if len(g) == batch_size] or groups  # a short last batch would skew
    random.Random(seed).shuffle(groups)
    batches = [pad_batch(g) for g in groups]
    return Workload(name, batch_size, batches, [len(g) for g in groups], padding_ratio(batches))


@dataclass
class Timing:
    samples: int
    batches: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def time_workload(engine: Engine, work: Workload, min_seconds: float, start_at: int = 0) -> Timing:
    """Runs batches (cycling from `start_at`) until `min_seconds` have passed and at least 2 batches ran;
    with lanes, that many threads do so at once on the one session (each from its own offset)."""
    if engine.lanes > 1:
        with ThreadPoolExecutor(engine.lanes) as pool:
            parts = list(pool.map(lambda k: _time_lane(engine, work, min_seconds, start_at + k * 97),
                                  range(engine.lanes)))
        return Timing(sum(p.samples for p in parts), sum(p.batches for p in parts), max(p.seconds for p in parts))
    return _time_lane(engine, work, min_seconds, start_at)


def _time_lane(engine: Engine, work: Workload, min_seconds: float, start_at: int) -> Timing:
    samples = n = 0
    t0 = time.perf_counter()
    while True:
        i = (start_at + n) % len(work.batches)
        engine.run(work.batches[i])
        samples += work.sizes[i]
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds and n >= 2:
            return Timing(samples, n, elapsed)


def throughput_sweep(
    engines: dict[str, Engine],
    items: Sequence[EncodedRequest],
    batch_sizes: Sequence[int],
    *,
    arrival_order_precisions: Sequence[str] = ("fp32",),
    rounds: int = 3,
    min_seconds: float = 2.0,
    pool: int = 1024,
    seed: int = 11,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """samples/s for every (precision, batch size), length-grouped; also FIFO-order batches for some.

    Rounds interleave all configurations, so a slow spell on a shared machine hits them alike. Each
    configuration reports the median of its rounds (and the min and max): on shared hosts large batches
    are sometimes twice as fast for a few seconds, and a best-of would pick such an outlier as the limit.
    """
    rng = random.Random(seed)
    sample = rng.sample(list(items), min(pool, len(items)))
    configs: list[tuple[str, str, Workload]] = []
    for precision in engines:
        for bs in batch_sizes:
            configs.append((precision, "grouped", make_workload(f"{precision}/b{bs}", sample, bs, True, seed + bs)))
        if precision in arrival_order_precisions:
            for bs in batch_sizes:
                if bs > 1:  # batch 1 has no padding: identical to the grouped run
                    configs.append((precision, "arrival",
                                    make_workload(f"{precision}/b{bs}/arrival", sample, bs, False, seed + bs)))
    for precision, _, work in configs:  # warm-up: ORT allocates per shape on first use
        engines[precision].run(work.batches[0])
    runs: dict[str, list[float]] = {w.name: [] for _, _, w in configs}
    foreign: dict[str, list[float]] = {w.name: [] for _, _, w in configs}
    monitor = CpuMonitor()
    for r in range(rounds):
        for k, (precision, policy, work) in enumerate(configs):
            monitor.start()
            timing = time_workload(engines[precision], work, min_seconds, start_at=r * 7)
            cpu = monitor.stop()
            runs[work.name].append(timing.rate)
            foreign[work.name].append(cpu["foreign_cores"])
            progress(f"  round {r + 1}/{rounds} [{k + 1}/{len(configs)}] {precision} batch {work.batch_size:>2} "
                     f"{policy:<8} {timing.rate:8.1f} samples/s (padding {work.padding:.0%}, other tenants "
                     f"{cpu['foreign_cores']:.2f} cores)")
    table: dict[str, Any] = {"rounds": rounds, "min_seconds_per_run": min_seconds, "pool": len(sample),
                             "grouped": {}, "arrival": {}}
    for precision, policy, work in configs:
        rates = runs[work.name]
        table[policy].setdefault(precision, {})[str(work.batch_size)] = {
            "samples_per_s": round(float(np.median(rates)), 2),
            "samples_per_s_min": round(min(rates), 2),
            "samples_per_s_max": round(max(rates), 2),
            "samples_per_s_runs": [round(x, 2) for x in rates],
            "foreign_cores_runs": foreign[work.name],
            "padding_ratio": round(work.padding, 4),
        }
    best = {}
    for precision, by_bs in table["grouped"].items():
        bs, row = max(by_bs.items(), key=lambda kv: kv[1]["samples_per_s"])
        peak_bs, peak = max(by_bs.items(), key=lambda kv: kv[1]["samples_per_s_max"])
        best[precision] = {"batch_size": int(bs), "samples_per_s": row["samples_per_s"],
                           "peak_batch_size": int(peak_bs), "peak_samples_per_s": peak["samples_per_s_max"]}
    table["best"] = best
    table["statistic"] = "median of rounds"
    return table


def probe(engine: Engine, work: Workload, seconds: float) -> float:
    """A short raw-engine measurement (samples/s) taken next to a server step, to track machine drift."""
    return time_workload(engine, work, seconds).rate

"""What the server's /metrics and /proc say: sums over label sets, the batcher's work between two scrapes,
the serving versions, a process's RSS."""

from __future__ import annotations

import re
from pathlib import Path


def metric_sum(values: dict[str, float], name: str) -> float:
    """Sum of a metric over all its label sets (e.g. every model's `scoring_batch_size_sum`)."""
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def batch_stats(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float | None]:
    """What the server's batcher and engine did between two scrapes."""
    def delta(name: str) -> float:
        return metric_sum(after, name) - metric_sum(before, name)

    # Lanes run batches at once: busy and per-busy-second figures are per lane-second of the serving
    # version (the largest lane count scraped; 1 for a server without lanes).
    lanes = max([v for k, v in after.items() if k.startswith("scoring_engine_lanes")] or [1.0])
    batches = delta("scoring_batch_size_count")
    items = delta("scoring_batch_size_sum")
    engine_s = delta("scoring_inference_duration_seconds_sum")
    waits = delta("scoring_queue_wait_seconds_count")
    requests = delta("scoring_request_duration_seconds_count")

    def ratio(a: float, b: float, digits: int = 4) -> float | None:
        return round(a / b, digits) if b > 0 else None

    return {
        "batches": batches,
        "items": items,
        "mean_batch_size": ratio(items, batches, 2),
        "mean_padding_ratio": ratio(delta("scoring_batch_padding_ratio_sum"), batches),
        "engine_lanes": lanes,
        "engine_busy_fraction": ratio(engine_s, wall_s * lanes),
        "engine_items_per_busy_s": ratio(items * lanes, engine_s, 2),
        "mean_engine_ms_per_batch": ratio(engine_s * 1000, batches, 2),
        "mean_queue_wait_ms": ratio(delta("scoring_queue_wait_seconds_sum") * 1000, waits, 2),
        "mean_server_request_ms": ratio(delta("scoring_request_duration_seconds_sum") * 1000, requests, 2),
        "cache_hit_share": ratio(delta("scoring_cache_hits_total"),
                                 delta("scoring_cache_hits_total") + delta("scoring_cache_misses_total")),
    }


def rss_mib(pid: int) -> float:
    """Resident set size of a process (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


_VERSION_LABEL = re.compile(r'version="(\d+)"')


def serving_versions(values: dict[str, float]) -> list[int]:
    out = []
    for key, v in values.items():
        if key.startswith("scoring_model_info{") and 'state="serving"' in key and v:
            m = _VERSION_LABEL.search(key)
            if m:
                out.append(int(m.group(1)))
    return sorted(out)


def per_version(values: dict[str, float], name: str) -> dict[int, float]:
    """A counter's value by its `version` label (summed over other labels)."""
    out: dict[int, float] = {}
    for key, v in values.items():
        if key.startswith(name + "{"):
            m = _VERSION_LABEL.search(key)
            if m:
                out[int(m.group(1))] = out.get(int(m.group(1)), 0.0) + v
    return out

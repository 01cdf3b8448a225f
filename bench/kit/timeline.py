"""Load over time and the server over time: open-loop chunks with no gap (`run_segments`), every call's send
time, latency and status (`Calls`), the server sampled as it goes (`sample`, `median_rss`), and the
timeline plot."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.kit.fmt import ms
from bench.kit.machine import CpuMonitor
from bench.kit.publish import _shrink_png
from bench.kit.scrape import metric_sum, rss_mib, serving_versions
from bench.kit.server import ServerProcess
from bench.kit.swap import Swap
from loadtest.openloop import LoadConfig, LoadResult, latency_summary, run_open_loop

OK, REFUSED = "OK", "RESOURCE_EXHAUSTED"


@dataclass
class Sample:
    t: float  # seconds from the run's start
    rss_mib: float
    queue_depth: float | None
    serving: list[int]
    server_cores: float
    foreign_cores: float
    lost_total: float | None


async def sample(server: ServerProcess, t0: float, interval_s: float, into: list[Sample]) -> None:
    """Samples the server into `into` every `interval_s` until cancelled: RSS and CPU from /proc, its /metrics."""
    monitor = CpuMonitor(server.pid)
    monitor.start()
    while True:
        await asyncio.sleep(interval_s)
        cpu = monitor.stop()
        monitor.start()
        try:
            values = await server.ascrape()
        except OSError:
            values = {}  # a slow scrape under overload is not a reason to stop sampling
        into.append(Sample(
            t=round(time.perf_counter() - t0, 3), rss_mib=round(rss_mib(server.pid), 1),
            queue_depth=metric_sum(values, "scoring_queue_depth") if values else None,
            serving=serving_versions(values), server_cores=cpu["server_cores"], foreign_cores=cpu["foreign_cores"],
            lost_total=metric_sum(values, "model_lost_total") if values else None))


def median_rss(samples: Sequence[Sample]) -> float | None:
    return float(np.median([x.rss_mib for x in samples])) if samples else None


@dataclass(frozen=True)
class Segment:
    name: str
    rate: float  # offered requests/s
    seconds: float


@dataclass
class Calls:
    """Every call of a run: scheduled send time (s from the run's start), latency (s), gRPC status name."""

    t: np.ndarray
    latency: np.ndarray
    code: np.ndarray
    chunks: list[dict[str, Any]] = field(default_factory=list)

    def mask(self, lo: float = -math.inf, hi: float = math.inf) -> np.ndarray:
        return (self.t >= lo) & (self.t < hi)

    def stats(self, lo: float = -math.inf, hi: float = math.inf) -> dict[str, Any]:
        """Calls scheduled in [lo, hi): counts by status, latency of OK calls and of refused calls."""
        m = self.mask(lo, hi)
        codes, counts = np.unique(self.code[m], return_counts=True)
        failures = {str(c): int(n) for c, n in zip(codes, counts, strict=True) if c != OK}
        ok = int((m & (self.code == OK)).sum())
        lo, hi = max(lo, 0.0), min(hi, float(self.t.max()) if self.t.size else 0.0)
        return {"from_s": round(lo, 2), "to_s": round(hi, 2), "calls": int(m.sum()), "ok": ok, "failures": failures,
                "failed": sum(failures.values()),
                "offered_rate": round(int(m.sum()) / (hi - lo), 2) if hi > lo else None,
                "ok_rate": round(ok / (hi - lo), 2) if hi > lo else None,
                "ok_latency": latency_summary(self.latency[m & (self.code == OK)]),
                "refused_latency": latency_summary(self.latency[m & (self.code == REFUSED)])}

    def series(self, bin_s: float, end_s: float) -> dict[str, np.ndarray]:
        """Per time bin: offered/s, OK/s, refused/s, other failures/s, and p50/p99 of OK latency (ms)."""
        edges = np.arange(0.0, end_s + bin_s, bin_s)
        n = len(edges) - 1
        idx = np.clip(np.digitize(self.t, edges) - 1, 0, n - 1)
        ok, refused = self.code == OK, self.code == REFUSED
        p50, p99 = np.full(n, np.nan), np.full(n, np.nan)
        for i in range(n):
            if (lat := self.latency[(idx == i) & ok]).size:
                p50[i], p99[i] = np.percentile(lat, [50, 99]) * 1000

        def per_s(weights: np.ndarray | None = None) -> np.ndarray:
            return np.bincount(idx, weights=weights, minlength=n)[:n] / bin_s

        return {"t": edges[:-1] + bin_s / 2, "offered": per_s(), "ok": per_s(ok), "refused": per_s(refused),
                "other": per_s(~ok & ~refused), "p50_ms": p50, "p99_ms": p99}


async def run_segments(channel: grpc.aio.Channel, requests: Sequence[bytes], segments: Sequence[Segment], *,
                       t0: float, chunk_s: float, timeout_s: float, seed: int,
                       on_chunk: Callable[[Segment, float, LoadResult], None], stop: asyncio.Event) -> Calls:
    """Open-loop Poisson load, segment after segment, from `t0` (perf_counter) on.

    Each segment is cut into equal chunks of about `chunk_s`; chunk k starts sending at its slot whatever
    the previous one still awaits, so the offered load has no gap and no coordinated omission. Once `stop`
    is set, chunks not yet started are skipped (a run that lasts until something else is done). `on_chunk` is
    called with each chunk's result."""
    plan: list[tuple[Segment, float, float]] = []
    offset = 0.0
    for seg in segments:
        n = max(1, round(seg.seconds / chunk_s))
        plan += [(seg, offset + j * seg.seconds / n, seg.seconds / n) for j in range(n)]
        offset += seg.seconds

    async def chunk(k: int, seg: Segment, start: float, seconds: float) -> tuple[float, LoadResult] | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(t0 + start - time.perf_counter(), 0.0))
        if stop.is_set():
            return None
        actual = time.perf_counter() - t0 + 0.01  # run_open_loop's clock starts 10 ms after the call
        result = await run_open_loop(channel, requests, LoadConfig(rate=seg.rate, duration_s=seconds,
                                                                   timeout_s=timeout_s, warmup_s=0.0, seed=seed + k))
        on_chunk(seg, actual, result)
        return actual, result

    ran = await asyncio.gather(*(chunk(k, *p) for k, p in enumerate(plan)))
    done = [(seg, *d) for (seg, _, _), d in zip(plan, ran, strict=True) if d is not None]
    return Calls(
        t=np.concatenate([start + res.scheduled_s for _, start, res in done] or [np.zeros(0)]),
        latency=np.concatenate([res.latency_s for _, _, res in done] or [np.zeros(0)]),
        code=np.array([c for _, _, res in done for c in res.codes], dtype=object),
        chunks=[{"segment": seg.name, "start_s": round(start, 3), **{k: v for k, v in res.summary().items()
                                                                      if k in ("offered_rate", "ok", "failures")}}
                for seg, start, res in done])


def chunk_line(seg: Segment, start: float, res: LoadResult, samples: Sequence[Sample] = ()) -> str:
    s, last = res.summary(), samples[-1] if samples else None
    lat = s["latency"]
    extra = (f"  RSS {last.rss_mib:.0f} MiB  queue {last.queue_depth if last.queue_depth is not None else '?':>4}"
             f"  serving v{','.join(map(str, last.serving)) or '?'}") if last else ""
    fails = ", ".join(f"{k} {v}" for k, v in s["failures"].items()) or "0 failed"
    return (f"{seg.name:>9} {start:6.0f}-{start + s['duration_s']:<6.0f}s offered {s['offered_rate']:6.1f}/s  "
            f"OK {s['ok'] / s['duration_s']:6.1f}/s  {fails}  p50 {ms(lat['p50_ms'])}  p99 {ms(lat['p99_ms'])}"
            + extra)


def plot_timeline(calls: Calls, samples: Sequence[Sample], path: Path, title: str, *, bin_s: float,
                  swaps: Sequence[Swap] = (), phases: Sequence[tuple[str, float, float]] = (),
                  reference_rate: float | None = None) -> Path:
    """Latency of every call over time (OK / refused / other failure), outcomes per second, RSS and queue depth;
    swap windows shaded (rename -> old version unloaded, a line where the new one starts serving)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = calls.series(bin_s, float(calls.t.max()) if calls.t.size else 1.0)
    fig, (ax_lat, ax_out, ax_mem) = plt.subplots(3, 1, figsize=(10.0, 8.0), sharex=True,
                                                 gridspec_kw={"height_ratios": [2.2, 1.2, 1.2]})
    rng = np.random.default_rng(0)
    for code, color, label, size in ((OK, "tab:blue", "OK", 2), (REFUSED, "tab:orange", REFUSED, 3),
                                     (None, "tab:red", "other failure", 6)):
        m = calls.code == code if code is not None else (calls.code != OK) & (calls.code != REFUSED)
        idx = np.flatnonzero(m)
        if idx.size > 20000:  # the plot stays small; percentiles use every call
            idx = np.sort(rng.choice(idx, 20000, replace=False))
        if idx.size:  # few points must stay visible, many must not smear
            ax_lat.scatter(calls.t[idx], calls.latency[idx] * 1000, s=size * 2, color=color, lw=0, rasterized=True,
                           alpha=0.7 if idx.size < 3000 else 0.25, label=f"{label} ({int(m.sum())})")
    ax_lat.plot(s["t"], s["p99_ms"], color="black", lw=1.2, label=f"p99 of OK per {bin_s:g} s")
    ax_lat.plot(s["t"], s["p50_ms"], color="grey", lw=1.0, ls="--", label=f"p50 of OK per {bin_s:g} s")
    ax_lat.set(yscale="log", ylabel="latency from scheduled send (ms)")
    ax_lat.set_title(title, fontsize=10)
    ax_lat.legend(fontsize=7, loc="upper left", markerscale=3)
    for key, color, label in (("offered", "black", "offered/s"), ("ok", "tab:blue", "OK/s"),
                              ("refused", "tab:orange", f"{REFUSED}/s"), ("other", "tab:red", "other failures/s")):
        if key in ("offered", "ok") or s[key].any():
            ax_out.plot(s["t"], s[key], color=color, lw=0.8 if key == "offered" else 1.0, label=label)
    if reference_rate:
        ax_out.axhline(reference_rate, color="tab:green", ls=":", lw=1, label=f"sustainable {reference_rate:.0f}/s")
    ax_out.set_ylabel(f"calls/s ({bin_s:g} s bins)")
    ax_out.legend(fontsize=7, loc="upper left")
    rss = [x.rss_mib for x in samples]
    ax_mem.plot([x.t for x in samples], rss, color="tab:purple", lw=1.2, label="server RSS (MiB)")
    if rss:  # at least ±5% around the median, so that a flat line looks flat
        mid = float(np.median(rss))
        ax_mem.set_ylim(min(min(rss), 0.95 * mid) * 0.98, max(max(rss), 1.05 * mid) * 1.02)
    ax_mem.set(ylabel="RSS (MiB)", xlabel="seconds from the start of the load")
    if depth := [(x.t, x.queue_depth) for x in samples if x.queue_depth is not None]:
        ax_q = ax_mem.twinx()
        ax_q.plot(*zip(*depth, strict=True), color="tab:brown", lw=0.8, alpha=0.8)
        ax_q.set_ylabel("queue depth (items)", color="tab:brown")
    ax_mem.legend(fontsize=7, loc="upper left")
    for ax in (ax_lat, ax_out, ax_mem):
        for i, (name, lo, hi) in enumerate(phases):
            ax.axvspan(lo, hi, color="tab:red" if "over" in name else "grey", alpha=0.08 if i % 2 else 0.04, lw=0)
        for sw in swaps:
            ax.axvspan(sw.renamed_t, sw.end_t, color="tab:green", alpha=0.12, lw=0)
            if sw.serving_t is not None:
                ax.axvline(sw.serving_t, color="tab:green", lw=0.8)
        ax.grid(alpha=0.3)
    for label, x, ha, color in ([(name, (lo + hi) / 2, "center", "black") for name, lo, hi in phases]
                                + [(f"→v{sw.version}", sw.renamed_t, "left", "tab:green") for sw in swaps]):
        ax_out.annotate(label, (x, 0.97), xycoords=("data", "axes fraction"), ha=ha, va="top", fontsize=8,
                        color=color)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    _shrink_png(path)
    return path

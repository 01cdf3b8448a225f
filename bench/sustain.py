"""Shared by the sustained-load benchmarks (`bench.overload`, `bench.swaps`, `bench.soak`).

- **The sustainable rate** (`obtain_rate`): the highest offered rate the server answers with no failure,
  keeping up (≥ 95%) and p99 ≤ 1 s, as `make bench` defines it (`bench.serverload.judge`). A short
  saturation probe estimates capacity, then `bench.serverload.sweep` bisects below it. The answer is
  cached in `<out>/sustain/results.json`, keyed by a hash of `server/` and the server flags, so the
  tools of one run measure it once. `python -m bench.sustain` measures it alone.
- **Load over time** (`run_segments`): open-loop Poisson (`loadtest.openloop.run_open_loop`) in
  back-to-back chunks whose tails overlap (no gap in the offered load), so long runs can report as
  they go and every call keeps its absolute send time, latency and status.
- **The server over time** (`Sampler`): RSS from /proc, CPU (`bench.sysmon.CpuMonitor`), queue
  depth and serving version from the server's own /metrics.
- **Hot swaps** (`hot_swap`): a new version is staged by hard links (the bytes of the newest version,
  manifest renumbered) and renamed into the live repository, as the model tools do; its lifecycle
  (loading, ready, serving, previous version unloaded) is read from the server's JSON log.
- Window statistics, the timeline plot and the BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.data import DEFAULT_DATA, REPO_ROOT, load_pairs
from bench.docs import merge_section
from bench.engine import arrangement_flags
from bench.server import ServerProcess, ServerSpec, metric_sum, server_flags
from bench.serverload import SweepConfig, sweep
from bench.sysmon import CpuMonitor, machine_info
from loadtest.openloop import LoadConfig, LoadResult, latency_summary, run_open_loop, serialize_requests

OK = "OK"
REFUSED = "RESOURCE_EXHAUSTED"
LIFECYCLE_EVENTS = ("model_loading", "model_ready", "model_serving", "model_unloaded", "model_load_failed")
CACHE_MAX_AGE_S = 6 * 3600.0

Progress = Callable[[str], None]


def logger(tool: str) -> Progress:
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{tool} {time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    return log


# --- command line ---------------------------------------------------------------------------------------


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model-repo", type=Path, default=Path("model_repo"), help="repository with the demo model")
    ap.add_argument("--model", default="demo", help="model to serve (its newest complete version)")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="output root; results in <out>/<tool>/")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="JSONL query/title pairs (synthetic pairs when absent) [default: %(default)s]")
    ap.add_argument("--threads", type=int, default=0,
                    help="server --intra-op-threads, with --engine-lanes to fill the cores (0 = the server's default)")
    ap.add_argument("--server-args", default="", help="extra server flags, e.g. '--max-batch-size 8'")
    ap.add_argument("--timeout-s", type=float, default=5.0, help="gRPC deadline of every call")
    ap.add_argument("--rate", type=float, default=None,
                    help="the sustainable rate (req/s) to build the load on; default: cached or measured")
    ap.add_argument("--remeasure-rate", action="store_true", help="measure the sustainable rate even if cached")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--quick", action="store_true", help="short smoke run; numbers are rough")
    ap.add_argument("--benchmarks-md", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    ap.add_argument("--docs-dir", type=Path, default=REPO_ROOT / "docs" / "bench")
    ap.add_argument("--no-docs", action="store_true", help="do not touch BENCHMARKS.md and docs/bench/")


def throughput_flags(args: argparse.Namespace) -> list[str]:
    """Server flags that decide throughput, as `make bench` runs the server (fp32, result cache off so
    replayed pairs reach the engine, long connection age so the channel never reconnects mid-run)."""
    flags = ["--precision", "fp32", *arrangement_flags(args.threads), "--max-connection-age-s", "3600"]
    if "--cache-bytes" in server_flags(REPO_ROOT):
        flags += ["--cache-bytes", "0"]
    return [*flags, *args.server_args.split()]


# --- data and repository ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    requests: list[bytes]
    source: str
    pairs: int


def load_requests(version_dir: Path, data: Path | None) -> Workload:
    """Serialized ScoreRequests for every pair the model can encode (a pair with no tokens would be
    refused as INVALID_ARGUMENT and counted as a failure that is not the server's)."""
    from model_format.features import FeatureEncoder, FeatureError
    from model_format.manifest import read_manifest
    from scoring.v1 import scoring_pb2

    pairs = load_pairs(data)
    encoder = FeatureEncoder(version_dir, read_manifest(version_dir))
    kept = []
    for p in pairs.pairs:
        try:
            encoder.encode(p.query, p.title or None)
        except FeatureError:
            continue
        kept.append(scoring_pb2.ScoreRequest(query=p.query, title=p.title or None))
    source = pairs.source if pairs.real else "synthetic (the real pairs file is absent)"
    return Workload(serialize_requests(kept), source, len(kept))


def newest_version(model_repo: Path, model: str) -> Path:
    from model_format.repository import latest_complete, scan_model

    found = latest_complete(scan_model(model_repo, model, verify_checksums=False))
    if found is None:
        raise SystemExit(f"no complete version of {model} in {model_repo}; run `make demo` first")
    return found.path


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)  # same bytes, no copy, and the source is never opened for writing
    except OSError:
        shutil.copy2(src, dst)
    return dst


@contextmanager
def temp_repo(model_repo: Path, model: str, parent: Path) -> Iterator[tuple[Path, Path]]:
    """A throw-away repository holding only the newest version of `model` (hard links): the tools drop new
    versions into it without touching the real one. Yields (root, version folder)."""
    src = newest_version(model_repo, model)
    parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="repo-", dir=parent))
    try:
        dst = root / model / src.name
        dst.parent.mkdir(parents=True)
        shutil.copytree(src, dst, copy_function=_link_or_copy)
        yield root, dst
    finally:
        shutil.rmtree(root, ignore_errors=True)


def stage_and_publish(root: Path, model: str, src: Path, version: int) -> Path:
    """Version `version` with `src`'s bytes: hard links under a staging name, a fresh manifest that names the
    new version (the manifest is not in its own checksum list), then one atomic rename into place."""
    from model_format.repository import publish_version, staging_dir

    with staging_dir(root, model) as staged:
        for f in src.iterdir():
            if f.name != "manifest.json":
                _link_or_copy(str(f), str(staged / f.name))
        doc = json.loads((src / "manifest.json").read_text(encoding="utf-8"))
        doc["version"] = version
        (staged / "manifest.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return publish_version(staged, root, model, version)


# --- the server ---------------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    """Resident set size of a process (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def start_server(repo: Path, flags: Sequence[str], log_path: Path, progress: Progress) -> ServerProcess:
    server = ServerProcess(ServerSpec(repo, REPO_ROOT, list(flags), log_path))
    server.start()
    progress(f"server up in {server.start_seconds:.1f} s (pid {server.pid}, RSS {rss_mib(server.pid):.0f} MiB): "
             + " ".join(flags))
    return server


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


@dataclass
class Sample:
    t: float  # seconds from the run's start
    rss_mib: float
    queue_depth: float | None
    serving: list[int]
    server_cores: float
    foreign_cores: float
    lost_total: float | None


class Sampler:
    """Samples the server every `interval_s` until stopped: RSS, CPU, and (when `scrape`) /metrics."""

    def __init__(self, server: ServerProcess, t0: float, interval_s: float, scrape: bool = True) -> None:
        self.server, self.t0, self.interval_s, self.scrape = server, t0, interval_s, scrape
        self.samples: list[Sample] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        monitor = CpuMonitor(self.server.pid)
        monitor.start()
        while True:
            await asyncio.sleep(self.interval_s)
            cpu = monitor.stop()
            monitor.start()
            values: dict[str, float] | None = None
            if self.scrape:
                try:
                    values = await self.server.ascrape()
                except OSError:
                    values = None  # a slow scrape under overload is not a reason to stop sampling
            self.samples.append(Sample(
                t=round(time.perf_counter() - self.t0, 3), rss_mib=round(rss_mib(self.server.pid), 1),
                queue_depth=metric_sum(values, "scoring_queue_depth") if values else None,
                serving=serving_versions(values) if values else [],
                server_cores=cpu["server_cores"], foreign_cores=cpu["foreign_cores"],
                lost_total=metric_sum(values, "model_lost_total") if values else None))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> list[Sample]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.samples

    def between(self, lo: float, hi: float) -> list[Sample]:
        return [s for s in self.samples if lo <= s.t < hi]


class LifecycleLog:
    """Lifecycle events from the server's JSON log (stderr, `--log-level INFO`), timed from the run's start."""

    def __init__(self, path: Path, t0: float) -> None:
        self.path = path
        self.t0 = t0
        self.wall0 = time.time() - (time.perf_counter() - t0)  # wall clock at t0
        self._pos = 0
        self._partial = b""
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._pos)
                data = fh.read()
                self._pos = fh.tell()
        except OSError:
            return []
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        new = []
        for raw in lines:
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if isinstance(doc, dict) and doc.get("event") in LIFECYCLE_EVENTS:
                doc["t"] = round(self._time(doc), 3)
                new.append(doc)
        self.events += new
        return new

    def _time(self, doc: dict[str, Any]) -> float:
        try:  # logging's asctime, local time, millisecond resolution
            wall = dt.datetime.strptime(str(doc["time"]), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except (KeyError, ValueError):
            wall = time.time()
        return wall - self.wall0

    def find(self, event: str, version: int) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("event") == event and e.get("version") == version), None)

    async def wait(self, event: str, version: int, timeout_s: float) -> dict[str, Any] | None:
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            self.poll()
            found = self.find(event, version)
            if found is not None or self.find("model_load_failed", version) is not None:
                return found
            await asyncio.sleep(0.05)
        return None


@dataclass
class Swap:
    version: int
    previous: int
    renamed_t: float
    loading_t: float | None = None
    ready_t: float | None = None
    serving_t: float | None = None
    unloaded_t: float | None = None
    failed: str | None = None

    @property
    def end_t(self) -> float:
        return next(t for t in (self.unloaded_t, self.serving_t, self.ready_t, self.loading_t, self.renamed_t)
                    if t is not None)

    def phases(self) -> dict[str, float | None]:
        def gap(a: float | None, b: float | None) -> float | None:
            return round(b - a, 3) if a is not None and b is not None else None

        return {"detect_s": gap(self.renamed_t, self.loading_t),
                "load_verify_warm_golden_s": gap(self.loading_t, self.ready_t),
                "switch_s": gap(self.ready_t, self.serving_t),
                "drain_unload_s": gap(self.serving_t, self.unloaded_t),
                "total_s": gap(self.renamed_t, self.unloaded_t)}

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), **self.phases()}


async def hot_swap(root: Path, model: str, src: Path, version: int, previous: int, events: LifecycleLog,
                   t0: float, timeout_s: float = 180.0) -> Swap:
    """Drops `version` into the live repository and follows it until the previous version is unloaded."""
    await asyncio.to_thread(stage_and_publish, root, model, src, version)
    swap = Swap(version, previous, round(time.perf_counter() - t0, 3))
    deadline = time.perf_counter() + timeout_s
    for event, version_of, attr in (("model_loading", version, "loading_t"), ("model_ready", version, "ready_t"),
                                    ("model_serving", version, "serving_t"),
                                    ("model_unloaded", previous, "unloaded_t")):
        found = await events.wait(event, version_of, max(deadline - time.perf_counter(), 0.1))
        if found is None:
            failed = events.find("model_load_failed", version)
            swap.failed = str(failed.get("reason")) if failed else f"no {event} event within {timeout_s:.0f} s"
            break
        setattr(swap, attr, found["t"])
    return swap


# --- load ---------------------------------------------------------------------------------------------------


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

    def mask(self, lo: float = -math.inf, hi: float = math.inf, code: str | None = None) -> np.ndarray:
        m = (self.t >= lo) & (self.t < hi)
        return m & (self.code == code) if code is not None else m

    def stats(self, lo: float = -math.inf, hi: float = math.inf) -> dict[str, Any]:
        """Calls scheduled in [lo, hi): counts by status, latency of OK calls and of refused calls."""
        m = self.mask(lo, hi)
        codes, counts = np.unique(self.code[m], return_counts=True)
        by_code = {str(c): int(n) for c, n in zip(codes, counts, strict=True)}
        span = min(hi, float(self.t.max()) if self.t.size else 0.0) - max(lo, 0.0)
        failures = {c: n for c, n in by_code.items() if c != OK}
        return {
            "from_s": round(max(lo, 0.0), 2), "to_s": round(min(hi, float(self.t.max()) if self.t.size else 0.0), 2),
            "calls": int(m.sum()), "ok": by_code.get(OK, 0), "failures": failures,
            "failed": sum(failures.values()),
            "offered_rate": round(int(m.sum()) / span, 2) if span > 0 else None,
            "ok_rate": round(by_code.get(OK, 0) / span, 2) if span > 0 else None,
            "ok_latency": latency_summary(self.latency[m & (self.code == OK)]),
            "refused_latency": latency_summary(self.latency[m & (self.code == REFUSED)]),
        }

    def series(self, bin_s: float, end_s: float) -> dict[str, np.ndarray]:
        """Per time bin: offered/s, OK/s, refused/s, other failures/s, and p50/p99 of OK latency (ms)."""
        edges = np.arange(0.0, end_s + bin_s, bin_s)
        idx = np.clip(np.digitize(self.t, edges) - 1, 0, len(edges) - 2)
        n = len(edges) - 1
        ok = self.code == OK
        refused = self.code == REFUSED
        p50, p99 = np.full(n, np.nan), np.full(n, np.nan)
        for i in range(n):
            lat = self.latency[(idx == i) & ok]
            if lat.size:
                p50[i], p99[i] = np.percentile(lat, 50) * 1000, np.percentile(lat, 99) * 1000
        count = np.bincount(idx, minlength=n)[:n] / bin_s
        return {"t": edges[:-1] + bin_s / 2, "offered": count,
                "ok": np.bincount(idx, weights=ok, minlength=n)[:n] / bin_s,
                "refused": np.bincount(idx, weights=refused, minlength=n)[:n] / bin_s,
                "other": np.bincount(idx, weights=~ok & ~refused, minlength=n)[:n] / bin_s,
                "p50_ms": p50, "p99_ms": p99}


async def run_segments(
    channel: grpc.aio.Channel,
    requests: Sequence[bytes],
    segments: Sequence[Segment],
    *,
    t0: float,
    chunk_s: float,
    timeout_s: float,
    seed: int,
    on_chunk: Callable[[Segment, float, LoadResult], None] | None = None,
    stop: asyncio.Event | None = None,
) -> Calls:
    """Open-loop Poisson load, segment after segment, from `t0` (perf_counter) on.

    Each segment is cut into equal chunks of about `chunk_s`; chunk k starts sending at its slot whatever
    the previous one still awaits, so the offered load has no gap and no coordinated omission. Once `stop`
    is set, chunks not yet started are skipped (a run that lasts until something else is done)."""
    plan: list[tuple[Segment, float, float]] = []
    offset = 0.0
    for seg in segments:
        n = max(1, round(seg.seconds / chunk_s))
        plan += [(seg, offset + j * seg.seconds / n, seg.seconds / n) for j in range(n)]
        offset += seg.seconds

    async def chunk(k: int, seg: Segment, start: float, seconds: float) -> tuple[float, LoadResult] | None:
        if stop is None:
            await asyncio.sleep(max(t0 + start - time.perf_counter(), 0.0))
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(t0 + start - time.perf_counter(), 0.0))
            if stop.is_set():
                return None
        actual = time.perf_counter() - t0 + 0.01  # run_open_loop's clock starts 10 ms after the call
        result = await run_open_loop(channel, requests, LoadConfig(rate=seg.rate, duration_s=seconds,
                                                                   timeout_s=timeout_s, warmup_s=0.0,
                                                                   seed=seed + k))
        if on_chunk is not None:
            on_chunk(seg, actual, result)
        return actual, result

    ran = await asyncio.gather(*(chunk(k, *p) for k, p in enumerate(plan)))
    done = [d for d in ran if d is not None]
    chunks = [{"segment": seg.name, "start_s": round(d[0], 3), **{k: v for k, v in d[1].summary().items()
                                                                   if k in ("offered_rate", "ok", "failures")}}
              for (seg, _, _), d in zip(plan, ran, strict=True) if d is not None]
    if not done:
        return Calls(np.zeros(0), np.zeros(0), np.array([], dtype=object))
    return Calls(
        t=np.concatenate([start + res.scheduled_s for start, res in done]),
        latency=np.concatenate([res.latency_s for _, res in done]),
        code=np.array([c for _, res in done for c in res.codes], dtype=object),
        chunks=chunks,
    )


def chunk_line(seg: Segment, start: float, res: LoadResult, sampler: Sampler | None) -> str:
    s = res.summary()
    lat = s["latency"]
    last = sampler.samples[-1] if sampler is not None and sampler.samples else None
    extra = (f"  RSS {last.rss_mib:.0f} MiB  queue {last.queue_depth if last.queue_depth is not None else '?':>4}"
             f"  serving v{','.join(map(str, last.serving)) or '?'}") if last else ""
    fails = ", ".join(f"{k} {v}" for k, v in s["failures"].items()) or "0 failed"
    return (f"{seg.name:>9} {start:6.0f}-{start + s['duration_s']:<6.0f}s offered {s['offered_rate']:6.1f}/s  "
            f"OK {s['ok'] / s['duration_s']:6.1f}/s  {fails}  p50 {_ms(lat['p50_ms'])}  p99 {_ms(lat['p99_ms'])}"
            + extra)


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f} ms" if x >= 100 else f"{x:.1f} ms"


# --- the sustainable rate -------------------------------------------------------------------------------------


def server_code_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "server").rglob("*.py")):
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


async def measure_rate(server: ServerProcess, requests: Sequence[bytes], *, quick: bool, timeout_s: float,
                       probe_rate: float, progress: Progress) -> dict[str, Any]:
    """Capacity probe (overloaded for a few seconds: OK answers per second), then `bench.serverload.sweep`
    from half of it upwards, bisecting the boundary."""
    t = time.perf_counter()
    probe_s = 4.0 if quick else 6.0
    async with grpc.aio.insecure_channel(server.target) as channel:
        res = await run_open_loop(channel, requests, LoadConfig(rate=probe_rate, duration_s=probe_s,
                                                                timeout_s=timeout_s, warmup_s=1.5, seed=3))
    capacity = res.achieved_rate or res.completed_rate
    if capacity <= 0:
        raise RuntimeError(f"capacity probe at {probe_rate:.0f}/s got no OK answer: {res.failures}")
    progress(f"capacity probe: {probe_rate:.0f}/s offered for {probe_s:.0f} s -> {capacity:.1f} OK/s "
             f"({sum(res.failures.values())} failed); bisecting below it")
    cfg = SweepConfig(limit=capacity, fractions=[0.5, 0.8] if quick else [0.55, 0.75, 0.9],
                      step_s=5.0 if quick else 10.0, timeout_s=timeout_s, refine=1 if quick else 3,
                      max_reruns=0 if quick else 1)
    out = await sweep(server, requests, cfg, label="sustain", progress=progress)
    rate = out["max_sustained_rate"]
    fallback = None
    if rate <= 0:  # e.g. a machine so busy that even the lowest step failed: still run, and say so
        rate = 0.5 * min(s["achieved_rate"] for s in out["steps"])
        fallback = (f"no step was sustainable (lowest: {min(out['steps'], key=lambda s: s['fraction'])['verdict']});"
                    f" using half the lowest step's OK rate")
        progress(f"WARNING: {fallback}: {rate:.1f}/s")
    keep = ("fraction", "offered_rate", "achieved_rate", "failures", "latency", "sustainable", "verdict", "cpu")
    return {"rate": rate, "source": "measured", "capacity_probe": {"offered": probe_rate, "ok_per_s": capacity},
            "steps": [{k: s[k] for k in keep} for s in out["steps"]], "seconds": round(time.perf_counter() - t, 1),
            "quick": quick, "p99_bound_ms": cfg.p99_bound_ms, "fallback": fallback}


async def obtain_rate(server: ServerProcess, requests: Sequence[bytes], args: argparse.Namespace,
                      flags: Sequence[str], progress: Progress, probe_rate: float = 400.0) -> dict[str, Any]:
    """The sustainable rate: `--rate`, else a cached measurement of the same server code and flags, else
    measured now (and cached). A quick measurement is only reused by quick runs."""
    if args.rate:
        return {"rate": float(args.rate), "source": "--rate"}
    key = {"server_code": server_code_hash(), "flags": list(flags)}
    cache = args.out / "sustain" / "results.json"
    if cache.is_file() and not args.remeasure_rate:
        try:
            doc = json.loads(cache.read_text())
        except ValueError:
            doc = {}
        age = time.time() - float(doc.get("measured_at_epoch", 0))
        if doc.get("key") == key and age < CACHE_MAX_AGE_S and (args.quick or not doc.get("quick")):
            progress(f"sustainable rate {doc['rate']:.1f}/s: measured {age / 60:.0f} min ago on the same server "
                     f"code and flags ({cache}); --remeasure-rate to measure again")
            return {**doc, "source": f"cached: {cache}"}
    progress("measuring the sustainable rate (no failure, ≥ 95% kept up, p99 ≤ 1 s)")
    doc = await measure_rate(server, requests, quick=args.quick, timeout_s=args.timeout_s, probe_rate=probe_rate,
                             progress=progress)
    doc.update(key=key, measured_at_epoch=time.time(),
               measured_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(doc, indent=1) + "\n")
    progress(f"sustainable rate: {doc['rate']:.1f}/s (measured in {doc['seconds']:.0f} s, cached in {cache})")
    return doc


def rate_sentence(rate: dict[str, Any]) -> str:
    if rate["source"] == "--rate":
        return f"{rate['rate']:.1f} req/s (given with `--rate`)"
    how = "measured in this run" if rate["source"] == "measured" else f"measured {rate.get('measured_at', '')}"
    probe = rate.get("capacity_probe") or {}
    if rate.get("fallback"):
        how += f"; **{rate['fallback']}**"
    return (f"{rate['rate']:.1f} req/s ({how}: highest Poisson rate with no failure, ≥ 95% kept up and p99 ≤ "
            f"{rate.get('p99_bound_ms', 1000):.0f} ms; capacity probe {probe.get('ok_per_s', 0):.0f} OK/s at "
            f"{probe.get('offered', 0):.0f}/s offered{'; quick' if rate.get('quick') else ''})")


# --- reporting ----------------------------------------------------------------------------------------------


def machine_line(m: dict[str, Any]) -> str:
    return (f"Machine: {m['cpu_model']}, {m['usable_cpus']} CPUs, {m['ram_gib']} GiB RAM, onnxruntime "
            f"{m['onnxruntime']}, Python {m['python']}, {m['date']}, code {m['git']}, load average at start "
            f"{' '.join(m['loadavg_at_start'])}.")


def machine() -> dict[str, Any]:
    return machine_info(REPO_ROOT)


def fmt_ms(x: float | None) -> str:
    return "–" if x is None else f"{x:,.1f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def json_default(o: object) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def write_results(out_dir: Path, results: dict[str, Any]) -> Path:
    path = out_dir / "results.json"
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False, default=json_default) + "\n")
    return path


def publish_docs(args: argparse.Namespace, name: str, markdown: str, pngs: Sequence[Path],
                 progress: Progress) -> None:
    """This tool's section of BENCHMARKS.md (`bench.docs.merge_section`) and its plots in docs/bench/."""
    (args.out / name / "section.md").write_text(markdown)
    if args.no_docs:
        return
    args.docs_dir.mkdir(parents=True, exist_ok=True)
    for png in pngs:
        shutil.copyfile(png, args.docs_dir / png.name)
    existing = args.benchmarks_md.read_text() if args.benchmarks_md.exists() else ""
    args.benchmarks_md.write_text(merge_section(existing, name, markdown))
    progress(f"wrote its section of {args.benchmarks_md} and {len(pngs)} plot(s) into {args.docs_dir}")


def plot_timeline(calls: Calls, samples: Sequence[Sample], path: Path, title: str, *, bin_s: float,
                  swaps: Sequence[Swap] = (), phases: Sequence[tuple[str, float, float]] = (),
                  reference_rate: float | None = None) -> Path:
    """Latency of every call over time (OK / refused / other failure), outcomes per second, RSS and queue depth;
    swap windows shaded (rename -> old version unloaded, a line where the new one starts serving)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = float(calls.t.max()) if calls.t.size else 1.0
    s = calls.series(bin_s, end)
    fig, (ax_lat, ax_out, ax_mem) = plt.subplots(3, 1, figsize=(10.0, 8.0), sharex=True,
                                                 gridspec_kw={"height_ratios": [2.2, 1.2, 1.2]})
    rng = np.random.default_rng(0)
    for code, color, label, size in ((OK, "tab:blue", "OK", 2), (REFUSED, "tab:orange", "RESOURCE_EXHAUSTED", 3),
                                     (None, "tab:red", "other failure", 6)):
        m = calls.code == code if code is not None else (calls.code != OK) & (calls.code != REFUSED)
        idx = np.flatnonzero(m)
        if idx.size > 20000:  # the plot stays small; percentiles use every call
            idx = np.sort(rng.choice(idx, 20000, replace=False))
        if idx.size:
            alpha = 0.7 if idx.size < 3000 else 0.25  # few points must stay visible, many must not smear
            ax_lat.scatter(calls.t[idx], calls.latency[idx] * 1000, s=size * 2, color=color, alpha=alpha, lw=0,
                           label=f"{label} ({int(m.sum())})", rasterized=True)
    ax_lat.plot(s["t"], s["p99_ms"], color="black", lw=1.2, label=f"p99 of OK per {bin_s:g} s")
    ax_lat.plot(s["t"], s["p50_ms"], color="grey", lw=1.0, ls="--", label=f"p50 of OK per {bin_s:g} s")
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency from scheduled send (ms)")
    ax_lat.set_title(title, fontsize=10)
    ax_lat.legend(fontsize=7, loc="upper left", markerscale=3)
    ax_out.plot(s["t"], s["offered"], color="black", lw=0.8, label="offered/s")
    ax_out.plot(s["t"], s["ok"], color="tab:blue", lw=1.0, label="OK/s")
    if s["refused"].any():
        ax_out.plot(s["t"], s["refused"], color="tab:orange", lw=1.0, label="RESOURCE_EXHAUSTED/s")
    if s["other"].any():
        ax_out.plot(s["t"], s["other"], color="tab:red", lw=1.0, label="other failures/s")
    if reference_rate:
        ax_out.axhline(reference_rate, color="tab:green", ls=":", lw=1, label=f"sustainable {reference_rate:.0f}/s")
    ax_out.set_ylabel(f"calls/s ({bin_s:g} s bins)")
    ax_out.legend(fontsize=7, loc="upper left")
    ts = [x.t for x in samples]
    ax_mem.plot(ts, [x.rss_mib for x in samples], color="tab:purple", lw=1.2, label="server RSS (MiB)")
    if samples:  # at least ±5% around the median, so that a flat line looks flat
        rss = [x.rss_mib for x in samples]
        mid = float(np.median(rss))
        ax_mem.set_ylim(min(min(rss), 0.95 * mid) * 0.98, max(max(rss), 1.05 * mid) * 1.02)
    ax_mem.set_ylabel("RSS (MiB)")
    ax_mem.set_xlabel("seconds from the start of the load")
    depth = [(x.t, x.queue_depth) for x in samples if x.queue_depth is not None]
    if depth:
        ax_q = ax_mem.twinx()
        ax_q.plot([d[0] for d in depth], [d[1] for d in depth], color="tab:brown", lw=0.8, alpha=0.8)
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
    for name, lo, hi in phases:
        ax_out.annotate(name, ((lo + hi) / 2, 0.97), xycoords=("data", "axes fraction"), ha="center", va="top",
                        fontsize=8)
    for sw in swaps:
        ax_out.annotate(f"→v{sw.version}", (sw.renamed_t, 0.97), xycoords=("data", "axes fraction"), ha="left",
                        va="top", fontsize=7, color="tab:green")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    _shrink_png(path)
    return path


def _shrink_png(path: Path, colors: int = 96) -> None:
    """A palette PNG: a third of the size, so the plots can live in docs/ (the figure has few colours)."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


# --- python -m bench.sustain ----------------------------------------------------------------------------------


async def _main(args: argparse.Namespace) -> int:
    log = logger("sustain")
    version_dir = newest_version(args.model_repo, args.model)
    work = load_requests(version_dir, args.data)
    log(f"data: {work.source}: {work.pairs} pairs")
    flags = throughput_flags(args)
    out = args.out / "sustain"
    out.mkdir(parents=True, exist_ok=True)
    with temp_repo(args.model_repo, args.model, out) as (root, _):
        server = await asyncio.to_thread(start_server, root, [*flags, "--poll-interval-s", "0",
                                                              "--log-level", "WARNING"], out / "server.log", log)
        try:
            args.remeasure_rate, args.rate = True, None
            doc = await obtain_rate(server, work.requests, args, flags, log)
        finally:
            await asyncio.to_thread(server.stop)
    print(f"{doc['rate']:.1f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sustain",
                                 description="Measure the server's sustainable rate and cache it for "
                                             "bench.overload / bench.swaps / bench.soak.")
    add_common_args(ap)
    return asyncio.run(_main(ap.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())

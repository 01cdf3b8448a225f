"""python -m bench.cache_zipf --model-repo model_repo --out bench_out [--quick]

The result cache on a skewed workload, in one run: the raw engine limit (fp32, best batch size), the
server with `--cache-bytes 0` and with the cache on (default size), both under open-loop Poisson load,
and a check that cached answers equal computed ones.

The stream: the distinct model inputs of the real query/title pairs, ranked in a seeded random order
(the file carries no query frequencies, so the ranking cannot come from it) and drawn from a Zipf law,
P(rank k) ∝ k^-s. Sustained throughput is a steady state: before each cached step the cache is given
what `--warm-requests` earlier requests of the stream put there (the distinct inputs among that many
draws, each sent once, unmeasured), and the step then plays a fixed number of requests
(`--stream-requests`), so every step sees the same stream and the same hit rate whatever the rate
offered (a step that would outlast `--max-cached-step-s` plays fewer, and its table row says what they
imply). After the sweep one step at the best sustained rate starts from a cold cache, as a new version
does after a hot swap. Each step tags its requests with a site name of its own (from the model's site
vocabulary); the site is part of the cache key, so no step can hit an earlier step's entries, without
restarting the server. A site is a table look-up in the model input and costs the engine nothing.

Writes <out>/cache_zipf/results.json and cache_zipf.png, and its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import random
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.kit.data import DEFAULT_DATA, REPO_ROOT, load_pairs
from bench.kit.engine import arrangement, arrangement_flags, describe, load_engine, throughput_sweep
from bench.kit.machine import machine_info
from bench.kit.publish import merge_section
from bench.kit.rates import SweepConfig, next_fraction, run_step, sweep
from bench.kit.server import ServerProcess, ServerSpec, metric_sum, server_flags
from loadtest.openloop import SCORE_METHOD, LoadConfig, run_open_loop
from loadtest.workload import Pair
from model_format.features import EncodedRequest, FeatureEncoder, FeatureError
from model_format.manifest import Manifest
from model_format.repository import latest_complete, scan_model
from scoring.v1 import scoring_pb2
from server.cache import default_cache_bytes

NAME = "cache_zipf"
EXACT_ATOL = 1e-5  # tests/test_cache.py: cached == computed within 1e-5 (fp32 batch companions move last bits)
STREAM_POOL = 100_000  # Zipf draws the generator picks from uniformly: their empirical law is the Zipf law
T0 = time.perf_counter()
Step = dict[str, Any]


def log(msg: str) -> None:
    print(f"[{NAME} {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# ---- shared with bench.workers_scale ------------------------------------------------------------------

@dataclasses.dataclass
class ModelData:
    version_dir: Path
    manifest: Manifest
    encoder: FeatureEncoder
    pairs: list[Pair]  # distinct model inputs only, one pair each
    items: list[EncodedRequest]
    source: str
    pairs_read: int


def load_model_data(model_repo: Path, model: str, data: Path) -> ModelData:
    """The newest complete version and the real pairs, reduced to distinct model inputs (= cache keys)."""
    found = latest_complete(scan_model(model_repo, model, verify_checksums=False))
    if found is None or found.manifest is None:
        raise SystemExit(f"no complete version of {model} in {model_repo}; run `make demo` first")
    encoder = FeatureEncoder(found.path, found.manifest)
    pair_set = load_pairs(data)
    seen: set[EncodedRequest] = set()
    pairs, items = [], []
    for p in pair_set.pairs:
        try:
            item = encoder.encode(p.query, p.title or None)
        except FeatureError:
            continue
        if item not in seen:  # two pairs can truncate to the same input: one cache key, one rank
            seen.add(item)
            pairs.append(p)
            items.append(item)
    source = pair_set.source if pair_set.real else "synthetic (the real pairs file is absent)"
    return ModelData(found.path, found.manifest, encoder, pairs, items, source, len(pair_set.pairs))


def engine_limit(data: ModelData, threads: int, batch_sizes: Sequence[int], rounds: int,
                 min_seconds: float, progress: Callable[[str], None] = log) -> dict[str, Any]:
    """The raw ONNX Runtime fp32 throughput at its best batch size (bench.engine), the server's ceiling."""
    engine = load_engine(data.version_dir, data.manifest, "fp32", *arrangement(threads))
    table = throughput_sweep({"fp32": engine}, data.items, batch_sizes, arrival_order_precisions=(),
                             rounds=rounds, min_seconds=min_seconds, progress=progress)
    del engine
    gc.collect()  # the session's arenas and threads go before any server starts
    best = table["best"]["fp32"]
    return {"limit": best["samples_per_s"], "batch_size": best["batch_size"], "threads": threads,
            "arrangement": describe(threads),
            "rounds": rounds, "min_seconds": min_seconds,
            "by_batch": {bs: row["samples_per_s"] for bs, row in table["grouped"]["fp32"].items()},
            "table": table}




LIVE: list[ServerProcess] = []  # every server this run started, stopped again at exit whatever happened


async def start_server(server: ServerProcess) -> None:
    LIVE.append(server)  # before the start: a cancelled start may still leave a process behind
    await asyncio.to_thread(server.start)


def stop_all() -> None:
    """After asyncio.run has returned or raised (its threads joined): no server outlives the tool."""
    for server in LIVE:
        server.stop()


async def fraction_sweep(measure: Callable[[float], Awaitable[Step]], grid: Sequence[float], refine: int,
                         max_fraction: float) -> list[Step]:
    """serverload.sweep's order (the grid, then bisection by `serverload.next_fraction`) for callers that
    need their own step (a fresh stream per step, several connections); steps sorted by fraction."""
    steps = [await measure(f) for f in sorted(grid)]
    for _ in range(refine):
        f = next_fraction(steps, max_fraction=max_fraction)
        if f is None:
            break
        steps.append(await measure(f))
    return sorted(steps, key=lambda s: s["fraction"])


def sweep_outcome(steps: Sequence[Step], limit: float) -> dict[str, Any]:
    good = [s for s in steps if s["sustainable"]]
    best = max(good, key=lambda s: s["achieved_rate"]) if good else None
    top = max(steps, key=lambda s: s["achieved_rate"])
    return {"max_sustained_rate": best["achieved_rate"] if best else 0.0,
            "max_sustained_ratio": round(best["achieved_rate"] / limit, 3) if best else 0.0,
            "max_sustained_fraction_offered": best["fraction"] if best else None,
            "p99_at_max_sustained_ms": best["latency"]["p99_ms"] if best else None,
            "saturation_rate": top["achieved_rate"], "saturation_ratio": round(top["achieved_rate"] / limit, 3)}


def machine_table(m: dict[str, Any], elapsed_s: float) -> list[str]:
    return ["| | |", "|---|---|",
            f"| CPU | {m['cpu_model']} ({', '.join(m['cpu_features']) or 'no AVX-512/AMX'}) |",
            f"| cores | {m['usable_cpus']} usable of {m['logical_cpus']} logical |",
            f"| RAM | {m['ram_gib']} GiB |",
            f"| onnxruntime | {m['onnxruntime']} (CPUExecutionProvider), Python {m['python']} |",
            f"| date, code | {m['date']}, {m['git']} |",
            f"| load average at start | {' '.join(m['loadavg_at_start'])} |",
            f"| run time | {elapsed_s / 60:.1f} min |"]


def write_docs(name: str, markdown: str, png: Path, benchmarks_md: Path, docs_dir: Path) -> None:
    docs_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, docs_dir / png.name)
    existing = benchmarks_md.read_text() if benchmarks_md.exists() else ""
    benchmarks_md.write_text(merge_section(existing, name, markdown))


def fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


# ---- the stream ---------------------------------------------------------------------------------------

def zipf_probabilities(n: int, s: float) -> np.ndarray:
    w: np.ndarray = np.arange(1, n + 1, dtype=np.float64) ** -s
    p: np.ndarray = w / w.sum()
    return p


def expected_distinct(p: np.ndarray, n: int) -> float:
    """E[distinct keys among n iid draws] = Σ 1 − (1 − p_k)^n."""
    return float(np.sum(-np.expm1(n * np.log1p(-p))))


def implied_hit_rate(p: np.ndarray, n: int, window_from: float = 0.0) -> float:
    """Expected share of requests [window_from·n, n) that repeat an earlier request of the stream (what an
    unbounded cache, cold at request 0, answers without computing)."""
    m = int(window_from * n)
    if n - m <= 0:
        return 0.0
    new = expected_distinct(p, n) - expected_distinct(p, m)
    return 1.0 - new / (n - m)


def site_names(encoder: FeatureEncoder, count: int) -> list[str]:
    """Distinct known sites (an unknown one maps to the shared [UNK] row, i.e. the same cache key)."""
    names = sorted(encoder.sites, key=encoder.sites.__getitem__)
    if len(names) < count:
        raise SystemExit(f"the site vocabulary has {len(names)} entries; {count} are needed (one per step)")
    return names[:count]


class Stream:
    """Pre-serialized Zipf-distributed requests, one variant per site ("epoch")."""

    def __init__(self, pairs: Sequence[Pair], s: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.order = list(range(len(pairs)))
        random.Random(seed).shuffle(self.order)  # rank k -> pair: a seeded random ranking
        self.ranked = [pairs[i] for i in self.order]
        self.p = zipf_probabilities(len(pairs), s)
        self.draws = rng.choice(len(pairs), size=STREAM_POOL, p=self.p)
        self._cache: dict[str, list[bytes]] = {}

    def serialized(self, site: str) -> list[bytes]:
        """One body per rank, tagged with `site`."""
        if site not in self._cache:
            self._cache[site] = [scoring_pb2.ScoreRequest(query=p.query, title=p.title or None, site=site)
                                 .SerializeToString() for p in self.ranked]
        return self._cache[site]

    def warm_keys(self, requests: int, seed: int) -> list[int]:
        """The ranks that `requests` draws of the stream put in an unbounded cache (each once)."""
        draws = np.random.default_rng(seed).choice(len(self.p), size=requests, p=self.p)
        return sorted(set(draws.tolist()))

    def requests(self, site: str) -> list[bytes]:
        """What run_open_loop picks from uniformly: Zipf draws (shared bytes objects, no copies)."""
        bodies = self.serialized(site)
        return [bodies[k] for k in self.draws.tolist()]


# ---- measurements -------------------------------------------------------------------------------------

def cache_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    def d(name: str) -> float:
        return metric_sum(after, name) - metric_sum(before, name)

    hits, misses, coalesced = d("scoring_cache_hits_total"), d("scoring_cache_misses_total"), \
        d("scoring_cache_coalesced_total")
    admitted = hits + misses  # misses count coalesced items too: every admitted item not answered from the cache
    received = d("model_pv_total")  # every item, also those refused (RESOURCE_EXHAUSTED), which the cache
    # counters leave out: shares are of the items received, like the stream's implied hit rate
    return {"items_received": received, "items_admitted": admitted, "hits": hits, "coalesced": coalesced,
            "computed": misses - coalesced,
            "hit_rate": round(hits / received, 4) if received else None,
            "not_computed_rate": round((hits + coalesced) / received, 4) if received else None,
            "hit_rate_of_admitted": round(hits / admitted, 4) if admitted else None}


async def fetch(target: str, bodies: Sequence[bytes], timeout_s: float, group: int = 16) -> list[dict[int, float]]:
    """Scores for each body, `group` at a time (so the server batches them with companions). A call the
    server sheds (RESOURCE_EXHAUSTED: its admission control) is retried; any other error is raised."""
    out: list[dict[int, float]] = []
    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.unary_unary(SCORE_METHOD, request_serializer=None, response_deserializer=None)

        async def one(body: bytes) -> dict[int, float]:
            for attempt in range(20):
                try:
                    raw = await call(body, timeout=timeout_s)
                    return dict(scoring_pb2.ScoreResponse.FromString(raw).scores)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == 19:
                        raise
                    await asyncio.sleep(0.05 * (attempt + 1))
            raise AssertionError("unreachable")

        for i in range(0, len(bodies), group):
            out += await asyncio.gather(*(one(b) for b in bodies[i:i + group]))
    return out


def compare(a: Sequence[dict[int, float]], b: Sequence[dict[int, float]]) -> dict[str, Any]:
    diffs = [abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in x]
    same_keys = all(x.keys() == y.keys() for x, y in zip(a, b, strict=True))
    return {"answers": len(a), "scores": len(diffs), "same_srcids": same_keys,
            "max_abs_diff": max(diffs) if diffs else None,
            "bit_identical_share": round(sum(d == 0.0 for d in diffs) / len(diffs), 4) if diffs else None,
            "within_tolerance": same_keys and bool(diffs) and max(diffs) <= EXACT_ATOL}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.cache_zipf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repo", type=Path, default=Path("model_repo"))
    ap.add_argument("--model", default="demo")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="results go to <out>/cache_zipf/")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL query/title pairs [%(default)s]")
    ap.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent: P(rank k) ∝ k^-s")
    ap.add_argument("--stream-requests", type=int, default=6000,
                    help="requests per cached step (with --warm-requests, fixes the stream's hit rate)")
    ap.add_argument("--warm-requests", type=int, default=6000,
                    help="before each cached step the cache holds what this many earlier requests of the "
                         "stream put there (0 = every step from a cold cache)")
    ap.add_argument("--seed", type=int, default=7, help="ranking and Zipf draws")
    ap.add_argument("--threads", type=int, default=0,
                    help="ORT threads per run, offline and in the server (0 = the server's CPU default)")
    ap.add_argument("--batch-sizes", type=ints, default=[1, 8, 16, 32])
    ap.add_argument("--engine-rounds", type=int, default=2)
    ap.add_argument("--engine-min-s", type=float, default=1.5)
    ap.add_argument("--uncached-fractions", type=floats, default=[0.5, 0.8, 1.0],
                    help="cache off: steps as fractions of the engine limit")
    ap.add_argument("--step-s", type=float, default=10.0, help="cache off: seconds per step")
    ap.add_argument("--cached-fractions", type=floats, default=[1.0, 2.0, 3.0],
                    help="cache on: steps as fractions of the engine limit (each step lasts stream-requests/rate)")
    ap.add_argument("--max-cached-step-s", type=float, default=40.0,
                    help="cap on a cached step's length: at low rates it plays rate × this many requests instead "
                         "(fewer requests, a lower hit rate: the table shows what each step's stream implies)")
    ap.add_argument("--refine", type=int, default=2, help="bisection steps after each grid")
    ap.add_argument("--max-fraction", type=float, default=8.0)
    ap.add_argument("--timeout-s", type=float, default=5.0)
    ap.add_argument("--p99-bound-ms", type=float, default=1000.0)
    ap.add_argument("--exact-sample", type=int, default=200, help="distinct requests checked for exactness")
    ap.add_argument("--server-cwd", type=Path, default=REPO_ROOT)
    ap.add_argument("--quick", action="store_true", help="smoke run (~2 minutes); numbers are rough")
    ap.add_argument("--benchmarks-md", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    ap.add_argument("--docs-dir", type=Path, default=REPO_ROOT / "docs" / "bench")
    ap.add_argument("--no-docs", action="store_true", help="leave BENCHMARKS.md and docs/bench/ alone")
    ap.add_argument("--from-results", type=Path, default=None, metavar="RESULTS_JSON",
                    help="measure nothing: rewrite the plot, summary and BENCHMARKS.md section from a results.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.engine_rounds, args.engine_min_s = [8, 16], 1, 0.8
        args.uncached_fractions, args.step_s = [0.6, 1.0], 4.0
        args.cached_fractions, args.stream_requests, args.refine = [1.5, 3.0], 2000, 0
        args.warm_requests = 2000
        args.max_cached_step_s = 10.0
        args.exact_sample = 60
    return args


async def uncached_phase(args: argparse.Namespace, data: ModelData, limit: float, requests: list[bytes],
                         exact_bodies: list[bytes]) -> tuple[dict[str, Any], list[dict[int, float]]]:
    flags = server_flags(threads=args.threads, pin=(args.model, data.manifest.version))
    out_dir = args.out / NAME
    server = ServerProcess(ServerSpec(args.model_repo, args.server_cwd, flags, out_dir / "server-cache-off.log"))
    cfg = SweepConfig(limit=limit, fractions=args.uncached_fractions, step_s=args.step_s, timeout_s=args.timeout_s,
                      p99_bound_ms=args.p99_bound_ms, refine=args.refine, max_fraction=args.max_fraction,
                      max_reruns=0 if args.quick else 2)
    try:
        await start_server(server)
        log(f"cache off: server up in {server.start_seconds:.1f} s; steps of {args.step_s:.0f} s at "
            f"{args.uncached_fractions} × {limit:.1f}/s")
        result = await sweep(server, requests, cfg, label="cache off", progress=log)
        reference = await fetch(server.target, exact_bodies, args.timeout_s)
    finally:
        await asyncio.to_thread(server.stop)
    result.update(sweep_outcome(result["steps"], limit), command=server.command)
    return result, reference


async def cached_phase(args: argparse.Namespace, data: ModelData, limit: float, stream: Stream,
                       sites: list[str], exact_bodies: list[bytes], exact_site: str
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    flags = server_flags(threads=args.threads, pin=(args.model, data.manifest.version), cache=True)
    out_dir = args.out / NAME
    server = ServerProcess(ServerSpec(args.model_repo, args.server_cwd, flags, out_dir / "server-cache-on.log"))
    cfg = SweepConfig(limit=limit, fractions=args.cached_fractions, timeout_s=args.timeout_s,
                      p99_bound_ms=args.p99_bound_ms, max_fraction=args.max_fraction)
    epochs = iter(sites)
    n = args.stream_requests

    async def measure(channel: grpc.aio.Channel, fraction: float, warm: int = args.warm_requests) -> Step:
        site = next(epochs)
        if warm:
            keys = stream.warm_keys(warm, seed=args.seed + len(sites) + int(fraction * 1000))
            bodies = stream.serialized(site)
            t0 = time.perf_counter()
            await fetch(server.target, [bodies[k] for k in keys], args.timeout_s)
            log(f"    warm-up: {len(keys):,} distinct inputs of {warm:,} draws in {time.perf_counter() - t0:.1f} s")
        # Every step the same stream length (so the same hit rate), unless that would take too long.
        step_cfg = dataclasses.replace(cfg, step_s=min(n / (fraction * limit), args.max_cached_step_s))
        before = await server.ascrape()
        step = await run_step(server, channel, stream.requests(site), fraction, step_cfg, None, log, "cache on")
        step["cache"] = cache_delta(before, await server.ascrape())
        step["site"] = site
        step["warm_requests"] = warm
        sent = step["scheduled"]
        step["implied_hit_rate"] = round(implied_hit_rate(stream.p, warm + sent, warm / (warm + sent)), 4)
        step["implied_hit_rate_window"] = round(
            implied_hit_rate(stream.p, warm + sent, (warm + 0.2 * sent) / (warm + sent)), 4)
        c = step["cache"]
        log(f"    hits {c['hit_rate']}, coalesced {c['coalesced']:.0f}, not computed {c['not_computed_rate']} "
            f"(stream implies {step['implied_hit_rate']:.3f}); generator {step['cpu']['bench_cores']:.2f} cores, "
            f"send lag p99 {step['send_lag_p99_ms']} ms")
        return step

    try:
        await start_server(server)
        log(f"cache on: server up in {server.start_seconds:.1f} s; {n} requests per step at "
            f"{args.cached_fractions} × {limit:.1f}/s, each step "
            + (f"after {args.warm_requests} requests' warm-up" if args.warm_requests else "with a cold cache"))
        async with grpc.aio.insecure_channel(server.target) as channel:
            # Connection and first-call paths, on a site no measured step uses.
            await run_open_loop(channel, stream.requests(next(epochs)),
                                LoadConfig(rate=max(2.0, 0.2 * limit), duration_s=3.0, timeout_s=args.timeout_s))
            steps = await fraction_sweep(lambda f: measure(channel, f), args.cached_fractions, args.refine,
                                         args.max_fraction)
            best = max((x for x in steps if x["sustainable"]), key=lambda x: x["achieved_rate"], default=None)
            cold = None
            if best is not None and args.warm_requests:
                log(f"cold start: {best['fraction']:.2f} × limit from a cold cache (a new version after a swap)")
                cold = await measure(channel, best["fraction"], warm=0)
            # Exactness: fill the cache under load (answers computed in real batches), then read the sample.
            log(f"exactness: the stream on site {exact_site!r} at 1.0 × limit for 5 s, then {len(exact_bodies)} "
                "sampled requests twice")
            await run_open_loop(channel, stream.requests(exact_site),
                                LoadConfig(rate=limit, duration_s=5.0, timeout_s=args.timeout_s, seed=99))
        before = await server.ascrape()
        first = await fetch(server.target, exact_bodies, args.timeout_s)
        mid = await server.ascrape()
        second = await fetch(server.target, exact_bodies, args.timeout_s)
        after = await server.ascrape()
        cache_bytes = metric_sum(after, "scoring_cache_bytes")
        entries = metric_sum(after, "scoring_cache_entries")
    finally:
        await asyncio.to_thread(server.stop)
    result = {"steps": steps, **sweep_outcome(steps, limit), "stream_requests_per_step": n, "cold_start": cold,
              "command": server.command, "cache_bytes_bound": default_cache_bytes(),
              "cache_entries_at_end": entries, "cache_bytes_at_end": cache_bytes}
    exact = {"first_pass": first, "second_pass": second,
             "first_pass_cache": cache_delta(before, mid), "second_pass_cache": cache_delta(mid, after)}
    return result, exact


def plot(results: dict[str, Any], path: Path) -> Path:
    limit = results["engine"]["limit"]
    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    top = 3 * limit
    for key, name, color in (("cache_off", "cache off", "tab:blue"), ("cache_on", "cache on", "tab:green")):
        steps = results[key]["steps"]
        off = [s["offered_rate"] for s in steps]
        top = max(top, *off)
        ax_tp.plot(off, [s["achieved_rate"] for s in steps], "o-", color=color, label=name)
        for s in steps:
            if not s["sustainable"]:
                ax_tp.plot(s["offered_rate"], s["achieved_rate"], "x", color="black", ms=7)
        lat = [(s["offered_rate"], s["latency"]["p99_ms"]) for s in steps if s["latency"]["p99_ms"] is not None]
        ax_lat.plot([x for x, _ in lat], [y for _, y in lat], "o-", color=color, label=f"{name} p99")
    ax_tp.plot([0, top * 1.05], [0, top * 1.05], ":", color="grey", label="achieved = offered")
    ax_tp.axhline(limit, color="black", lw=1, ls="--", label=f"raw engine limit ({limit:.0f}/s)")
    ax_tp.axhline(3 * limit, color="tab:red", lw=1, ls="--", label=f"target 3 × limit ({3 * limit:.0f}/s)")
    ax_tp.set_xlabel("offered load (requests / s, Poisson)")
    ax_tp.set_ylabel("achieved (OK responses / s)")
    ax_tp.set_title(f"Zipf s={results['stream']['s']} stream (x = not sustainable)", fontsize=10)
    ax_lat.axhline(results["args"]["p99_bound_ms"], color="black", lw=1, ls=":", label="p99 bound")
    ax_lat.set_yscale("log")
    ax_lat.set_xlabel("offered load (requests / s)")
    ax_lat.set_ylabel("p99 latency from scheduled send (ms)")
    ax_lat.set_title("p99 of OK calls", fontsize=10)
    for ax in (ax_tp, ax_lat):
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ax_tp.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def step_rows(steps: Sequence[Step], limit: float, cached: bool) -> list[str]:
    head = ("| offered (× limit) | offered/s | achieved/s | × limit | failed | p50 ms | p99 ms | "
            + ("requests | served from cache | coalesced | stream implies | " if cached else "")
            + "mean batch | server CPU | generator CPU | send lag p99 ms | foreign CPU | sustainable |")
    cols = head.count("|") - 1
    rows = [head, "|" + " ---: |" * (cols - 1) + " --- |"]
    for s in steps:
        lat, cpu = s["latency"], s["cpu"]
        failed = ", ".join(f"{k} {v}" for k, v in s["failures"].items()) or "0"
        cache = ""
        if cached:
            c = s["cache"]
            cache = (f"{s['scheduled']:,} | {fmt((c['hit_rate'] or 0) * 100)}% | {c['coalesced']:.0f} | "
                     f"{s['implied_hit_rate'] * 100:.1f}% | ")
        rows.append(f"| {s['fraction']:.2f} | {s['offered_rate']:.1f} | {s['achieved_rate']:.1f} | "
                    f"{s['achieved_rate'] / limit:.2f} | {failed} | {fmt(lat['p50_ms'])} | {fmt(lat['p99_ms'])} | "
                    f"{cache}{fmt(s['server']['mean_batch_size'])} | {cpu['server_cores']:.2f} | "
                    f"{cpu['bench_cores']:.2f} | {fmt(s['send_lag_p99_ms'])} | {cpu['foreign_cores']:.2f} | "
                    f"{'yes' if s['sustainable'] else 'no: ' + s['verdict']} |")
    return rows


def same_load_rows(off: Sequence[Step], on: Sequence[Step]) -> list[str]:
    """p99 with the cache off and on where both ran the same fraction of the limit."""
    rows = []
    for a in off:
        b = next((x for x in on if abs(x["fraction"] - a["fraction"]) < 1e-6), None)
        if b is not None:
            def cell(x: Step) -> str:
                return f"{fmt(x['latency']['p99_ms'])} ms{'' if x['sustainable'] else ' (not sustainable)'}"
            rows.append(f"| p99 at {a['fraction']:.2f} × limit ({a['offered_rate']:.0f}/s): cache off vs on | "
                        f"{cell(a)} vs {cell(b)} |  |")
    return rows


def cold_rows(cold: Step | None, limit: float) -> list[str]:
    if cold is None:
        return []
    lat = cold["latency"]
    failed = ", ".join(f"{k} {v}" for k, v in cold["failures"].items()) or "none"
    return [f"| cold start at the best sustained rate ({cold['offered_rate']:.0f}/s offered, cache empty as after "
            f"a swap): achieved, failed, p99, served from cache | {cold['achieved_rate']:.1f}/s, {failed}, "
            f"{fmt(lat['p99_ms'])} ms, {fmt((cold['cache']['hit_rate'] or 0) * 100)}% | "
            f"{cold['achieved_rate'] / limit:.2f} |"]


def markdown(results: dict[str, Any]) -> str:
    r, a, st, eng = results, results["args"], results["stream"], results["engine"]
    limit = eng["limit"]
    off, on, ex = r["cache_off"], r["cache_on"], r["exactness"]
    ratio = on["max_sustained_rate"] / limit
    met = ratio >= 3.0 and ex["cached_vs_uncached"]["within_tolerance"]
    best_on = next((s for s in on["steps"] if s["achieved_rate"] == on["max_sustained_rate"]
                    and s["sustainable"]), None)
    top_on = max(on["steps"], key=lambda s: s["offered_rate"])
    lines = [
        "## Result cache on a Zipf query stream (`python -m bench.cache_zipf`)",
        "",
        "Throughput and p99 with the result cache off (`--cache-bytes 0`) and on (default bound, "
        f"{r['cache_on']['cache_bytes_bound'] / 2**20:.0f} MiB here), in one run, against the raw engine "
        "limit measured in the same run. Target: at the stream's hit rate, sustained throughput ≥ 3 × the "
        "uncached limit, with no loss in exactness.",
        "",
        *machine_table(r["machine"], r["elapsed_s"]),
        "",
        "Reproduce: `python -m bench.cache_zipf --model-repo model_repo --out bench_out` "
        f"(results: `bench_out/{NAME}/results.json`).",
        "",
        "**The stream.** " + (
            f"{st['catalogue']:,} distinct model inputs (cache keys) from {st['source']} "
            f"({st['pairs_read']:,} pairs read). The file is a relevance set, not a query log: it carries no "
            "query frequencies (almost every query occurs once), so the popularity is imposed: the inputs are "
            f"ranked in a seeded random order and drawn iid from a Zipf law, P(rank k) ∝ k^-s with "
            f"**s = {st['s']:g}** (web query logs measure about 1.0–1.1). The top rank gets "
            f"{st['top1_share']:.1%} of requests, the top 10 {st['top10_share']:.1%}, the top 100 "
            f"{st['top100_share']:.1%}. " + (
                f"Sustained throughput is a steady state, so before every cached step the cache holds what "
                f"**{st['warm_requests']:,} earlier requests** of the stream put there (the distinct inputs among "
                f"{st['warm_requests']:,} draws, sent once each, unmeasured); the step then plays "
                f"**{st['requests_per_step']:,} requests**, of which the stream implies that "
                f"**{st['implied_hit_rate']:.1%} repeat an earlier request** "
                f"({st['implied_hit_rate_window']:.1%} in the measurement window, the last 80% of the step), "
                "the share an unbounded cache answers without computing. From a cold cache (a new version after "
                f"a hot swap) the same {st['requests_per_step']:,} requests imply "
                f"{st['implied_hit_rate_cold']:.1%}: one step below starts cold. "
                if st.get("warm_requests") else
                f"Every cached step plays **{st['requests_per_step']:,} requests from a "
                f"cold cache**; of those, the stream implies that **{st['implied_hit_rate']:.1%} repeat an earlier "
                f"request** ({st['implied_hit_rate_window']:.1%} in the measurement window, the last 80% of the "
                "step), the share an unbounded cache answers without computing. ")
            + "Each cached step tags its requests "
            "with a site of its own (site vocabulary), which is part of the cache key: a fresh cache for every "
            "step without restarting the server; a site is a table look-up and costs the engine nothing. "
            f"Mean tokens per request: {st['tokens_mean_stream']:.1f} in the stream (popularity-weighted) vs "
            f"{st['tokens_mean_catalogue']:.1f} over the distinct inputs."),
        "",
        "**Method.** Raw engine: `bench.engine.throughput_sweep`, fp32, length-grouped batches, "
        f"{eng.get('arrangement', str(eng['threads']) + ' intra-op threads')}, "
        f"{eng['rounds']} interleaved rounds of ≥ {eng['min_seconds']} s, "
        "median; the limit is the best batch size. Server: `python -m server --precision fp32 "
        f"{' '.join(arrangement_flags(a['threads']))}` (pinned, no polling), driven by `loadtest.openloop` (Poisson "
        "arrivals, latency from the scheduled send, pre-serialized requests, one channel). Cache off: "
        f"`bench.kit.rates.sweep`, steps of {a['step_s']:g} s. Cache on: "
        + ("the warm-up (`fetch`: 16 calls at a time, retried when refused), then " if st.get("warm_requests")
           else "") + "the same step "
        "(`bench.kit.rates.run_step`) and bisection (`next_fraction`), each step lasting "
        f"{st['requests_per_step']:,} / rate seconds (at most {a.get('max_cached_step_s', 40):g} s: a step capped "
        "so plays fewer requests, and its *stream implies* column is lower). Sustainable = no failures, "
        "achieved ≥ 95% of offered, "
        f"p99 ≤ {a['p99_bound_ms']:g} ms (deadline {a['timeout_s']:g} s). Served from cache, coalesced: the "
        "server's `scoring_cache_hits_total`, `scoring_cache_coalesced_total` over the step, as a share of the "
        "requests it received (`model_pv_total`; a refused request counts as not served from cache); *stream "
        "implies*: "
        "the expected share of that step's requests repeating an earlier one. Generator CPU is "
        "the load generator's process (it shares the cores with the server).",
        "",
        "| measure | value | × limit |",
        "| --- | ---: | ---: |",
        f"| raw engine fp32, batch {eng['batch_size']} = **the uncached limit** | {limit:.1f}/s | 1.00 |",
        f"| server, cache off: max sustained | {off['max_sustained_rate']:.1f}/s "
        f"(p99 {fmt(off['p99_at_max_sustained_ms'])} ms) | {off['max_sustained_rate'] / limit:.2f} |",
        f"| server, cache on: max sustained | **{on['max_sustained_rate']:.1f}/s** "
        f"(p99 {fmt(on['p99_at_max_sustained_ms'])} ms) | **{ratio:.2f}** (target ≥ 3.00: "
        f"{'met' if ratio >= 3.0 else 'NOT met'}) |",
        "| cache on: served from cache / coalesced at that step | "
        + (f"{best_on['cache']['hit_rate']:.1%} / {best_on['cache']['coalesced']:.0f} items |  |" if best_on
           else "– |  |"),
        f"| cache on: most completed/s at any step | {on['saturation_rate']:.1f}/s | "
        f"{on['saturation_ratio']:.2f} |",
        *same_load_rows(off["steps"], on["steps"]),
        *cold_rows(on.get("cold_start"), limit),
        f"| exactness: {ex['cached_vs_uncached']['answers']} cached answers vs the cache-off server | max "
        f"\\|Δ\\| {fmt(ex['cached_vs_uncached']['max_abs_diff'], 8)}, "
        f"{ex['cached_vs_uncached']['bit_identical_share']:.1%} bit-identical | "
        f"{'within' if ex['cached_vs_uncached']['within_tolerance'] else 'NOT within'} {EXACT_ATOL:g} |",
        "",
        f"**Target: {'met' if met else 'NOT met'}.** "
        + (f"With the cache on the server sustained {ratio:.2f} × the uncached engine limit at a "
           f"{best_on['cache']['not_computed_rate']:.0%} share of requests not computed (hits + coalesced)."
           if best_on else "With the cache on no step was sustainable."),
        "",
        "#### Cache off",
        "",
        *step_rows(off["steps"], limit, cached=False),
        "",
        "#### Cache on",
        "",
        *step_rows(on["steps"], limit, cached=True),
        "",
        "**Exactness.** On the cache-on server the stream ran on its own site at 1 × limit for 5 s (so its "
        f"popular answers were computed in real batches), then {ex['cached_vs_uncached']['answers']} distinct "
        "requests of that site (the top ranks and a random tail sample) were sent at once, twice: the second "
        f"pass had {ex['second_pass_cache']['hit_rate']:.0%} hits and returned exactly the first pass's scores "
        f"({'yes' if ex['second_vs_first']['bit_identical_share'] == 1.0 else 'NO'}: a cached answer is the row "
        "computed for the first request). Against the cache-off server's answers for the same request bytes: "
        f"max |Δ| {fmt(ex['cached_vs_uncached']['max_abs_diff'], 8)} over "
        f"{ex['cached_vs_uncached']['scores']:,} scores. Tolerance {EXACT_ATOL:g}, as `tests/test_cache.py`: in "
        "fp32 a request's batch companions (padding length, batch shape) can move the last bits of its scores, "
        "so two computations of the same request need not be bit-identical even without a cache.",
        "",
        f"![cache on vs off](docs/bench/{NAME}.png)",
        "",
        "**What limits it here.** " + (
            f"At the highest cached step ({top_on['offered_rate']:.0f}/s offered) the server used "
            f"{top_on['cpu']['server_cores']:.2f} cores, the load generator {top_on['cpu']['bench_cores']:.2f} "
            f"(send lag p99 {fmt(top_on['send_lag_p99_ms'])} ms) and other processes "
            f"{top_on['cpu']['foreign_cores']:.2f}, on {r['machine']['usable_cpus']} cores. "
            + ("The generator runs on the same cores as the server, so at these rates it takes CPU the server "
               "would otherwise use: the cached numbers are a lower bound for a server with the machine to "
               "itself. " if top_on["cpu"]["bench_cores"] >= 0.25 else "The generator's own CPU is small. ")
            + (f"It fell behind its schedule at that step (send lag p99 {fmt(top_on['send_lag_p99_ms'])} ms, charged "
               "to latency), a sign the cores were full. " if (top_on["send_lag_p99_ms"] or 0) > 20 else "")
            + f"At the stream's implied hit rate ({st['implied_hit_rate']:.1%}) the engine alone would cap the "
            f"cached throughput at limit / {1 - st['implied_hit_rate']:.3f} = "
            f"{1 / max(1 - st['implied_hit_rate'], 1e-9):.2f} × the limit, if the hits cost nothing. "
            "A miss still costs a full engine computation, and every request, hit or not, costs event-loop time "
            "(gRPC, decoding, tokenizing: the cache key is the tokenized input) on the same cores."),
    ]
    return "\n".join(lines) + "\n"


def exit_on_sigterm() -> None:
    """SIGTERM (timeout, a CI cancel) unwinds like Ctrl-C, so the `finally` blocks stop the servers."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    try:
        return run(args)
    finally:
        stop_all()


def run(args: argparse.Namespace) -> int:
    out_dir = args.out / NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.from_results is not None:
        write_outputs(args, json.loads(args.from_results.read_text()))
        return 0
    results: dict[str, Any] = {"machine": machine_info(REPO_ROOT)}
    m = results["machine"]
    log(f"{m['cpu_model']}, {m['usable_cpus']} CPUs, code {m['git']}, load average {' '.join(m['loadavg_at_start'])}")
    data = load_model_data(args.model_repo, args.model, args.data)
    stream = Stream(data.pairs, args.zipf_s, args.seed)
    n, w = args.stream_requests, args.warm_requests
    lengths = np.array([it.length for it in data.items])
    ranked_len = lengths[stream.order]
    results["stream"] = {
        "source": data.source, "pairs_read": data.pairs_read, "catalogue": len(data.pairs), "s": args.zipf_s,
        "seed": args.seed, "requests_per_step": n, "warm_requests": w,
        "implied_hit_rate": round(implied_hit_rate(stream.p, w + n, w / (w + n)), 4),
        "implied_hit_rate_window": round(implied_hit_rate(stream.p, w + n, (w + 0.2 * n) / (w + n)), 4),
        "implied_hit_rate_cold": round(implied_hit_rate(stream.p, n), 4),
        "top1_share": float(stream.p[0]), "top10_share": float(stream.p[:10].sum()),
        "top100_share": float(stream.p[:100].sum()),
        "tokens_mean_catalogue": float(lengths.mean()), "tokens_mean_stream": float((stream.p * ranked_len).sum()),
    }
    s = results["stream"]
    log(f"stream: {s['catalogue']} distinct inputs ({s['source']}), Zipf s={args.zipf_s}; {n} requests per step "
        f"after {w} imply {s['implied_hit_rate']:.1%} repeats ({s['implied_hit_rate_window']:.1%} in the window; "
        f"{s['implied_hit_rate_cold']:.1%} from a cold cache)")

    log(f"raw engine: fp32, batch sizes {args.batch_sizes}, {args.engine_rounds} round(s) of ≥ {args.engine_min_s} s")
    results["engine"] = engine_limit(data, args.threads, args.batch_sizes, args.engine_rounds, args.engine_min_s)
    limit = results["engine"]["limit"]
    log(f"  limit {limit:.1f}/s at batch {results['engine']['batch_size']}")

    # Sites: one for the cache-off run, one for the warm-up, one for exactness, one per cached step
    # and one for the cold start.
    steps_max = len(args.cached_fractions) + args.refine + 1
    sites = site_names(data.encoder, steps_max + 3)
    off_site, exact_site, on_sites = sites[0], sites[1], sites[2:]
    rng = random.Random(args.seed)
    k = len(data.pairs)
    top = min(args.exact_sample // 4, k)
    sample = list(range(top)) + rng.sample(range(top, k), min(args.exact_sample - top, k - top))
    exact_bodies = [stream.serialized(exact_site)[i] for i in sample]

    off, reference = asyncio.run(uncached_phase(args, data, limit, stream.requests(off_site), exact_bodies))
    results["cache_off"] = off
    on, exact = asyncio.run(cached_phase(args, data, limit, stream, on_sites, exact_bodies, exact_site))
    results["cache_on"] = on
    results["exactness"] = {
        "sample": len(sample), "top_ranks": top, "site": exact_site, "tolerance_abs": EXACT_ATOL,
        "cached_vs_uncached": compare(exact["second_pass"], reference),
        "second_vs_first": compare(exact["second_pass"], exact["first_pass"]),
        "first_pass_cache": exact["first_pass_cache"], "second_pass_cache": exact["second_pass_cache"],
    }
    ex = results["exactness"]
    log(f"exactness: cached vs uncached max |Δ| {ex['cached_vs_uncached']['max_abs_diff']}, bit-identical "
        f"{ex['cached_vs_uncached']['bit_identical_share']}; second pass hits {ex['second_pass_cache']['hit_rate']}")
    results["elapsed_s"] = round(time.perf_counter() - T0, 1)
    results["args"] = {key: str(v) if isinstance(v, Path) else v for key, v in vars(args).items()}
    write_outputs(args, results)
    log(f"done in {results['elapsed_s']:.0f} s; results in {out_dir}/")
    return 0


def write_outputs(args: argparse.Namespace, results: dict[str, Any]) -> None:
    out_dir = args.out / NAME
    png = plot(results, out_dir / f"{NAME}.png")
    md = markdown(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    (out_dir / "summary.md").write_text(md)
    print(md)
    if not args.no_docs:
        write_docs(NAME, md, png, args.benchmarks_md, args.docs_dir)


if __name__ == "__main__":
    raise SystemExit(main())

"""python -m bench.cache_zipf --model-repo model_repo --out bench_out [--quick]

The result cache on a skewed workload, in one run: the raw engine limit (fp32, best batch size), the server with the
cache off (`--cache-bytes 0`) and on (default size) under open-loop Poisson load, and cached answers against computed
ones. The stream: the distinct inputs of the real pairs, in a seeded random rank order, drawn from a Zipf law
P(rank k) ∝ k^-s. Each cached step starts with what `--warm-requests` earlier requests put in the cache (a steady
state) and plays `--stream-requests` requests (fewer past `--max-cached-step-s`): the same hit rate at every rate.
One more step at the best sustained rate starts cold, as after a hot swap. Each step has a site of its own, part of
the cache key and free for the engine: no step hits an earlier step's entries.

Writes <out>/cache_zipf/{results.json, section.md, cache_zipf.png} and its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import time
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from bench.kit import run
from bench.kit.cli import Progress, floats
from bench.kit.rates import Step, SweepConfig, outcome, run_step, search, sweep, warm_up
from bench.kit.run import ModelData, engine_limit, load_model_data, parse, parser, serving
from bench.kit.scrape import metric_sum
from bench.kit.server import server_flags
from bench.reports.cache_zipf import markdown, plot
from loadtest.openloop import SCORE_METHOD, LoadConfig, run_open_loop
from loadtest.workload import Pair
from scoring.v1 import scoring_pb2
from server.cache import default_cache_bytes

NAME = "cache_zipf"
EXACT_ATOL = 1e-5  # tests/test_cache.py: cached == computed within 1e-5 (fp32 batch companions move last bits)
STREAM_POOL = 100_000  # Zipf draws the generator picks from uniformly: their empirical law is the Zipf law
Scores = list[dict[int, float]]


def implied_hit_rate(p: np.ndarray, n: int, warm: int = 0, window: float = 0.0) -> float:
    """Expected share of the `n` requests after `warm` earlier ones (from `window` × n on) that repeat an earlier
    request of the stream: what an unbounded cache, cold before the warm-up, answers without computing."""
    def distinct(k: float) -> float:  # E[distinct keys among k iid draws] = Σ 1 − (1 − p_k)^k
        return float(np.sum(-np.expm1(int(k) * np.log1p(-p))))

    m = warm + window * n
    return round(1.0 - (distinct(warm + n) - distinct(m)) / (warm + n - int(m)), 4) if n else 0.0


class Stream:
    """Pre-serialized Zipf-distributed requests, one variant per site."""

    def __init__(self, pairs: Sequence[Pair], s: float, seed: int) -> None:
        self.order = list(range(len(pairs)))
        random.Random(seed).shuffle(self.order)  # rank k -> pair: a seeded random ranking
        self.ranked = [pairs[i] for i in self.order]
        w = np.arange(1, len(pairs) + 1, dtype=np.float64) ** -s
        self.p: np.ndarray = w / w.sum()
        self.draws = np.random.default_rng(seed).choice(len(pairs), size=STREAM_POOL, p=self.p).tolist()
        self._bodies: dict[str, list[bytes]] = {}

    def serialized(self, site: str) -> list[bytes]:
        """One body per rank, tagged with `site`."""
        if site not in self._bodies:
            self._bodies[site] = [scoring_pb2.ScoreRequest(query=p.query, title=p.title or None, site=site)
                                  .SerializeToString() for p in self.ranked]
        return self._bodies[site]

    def warm_keys(self, requests: int, seed: int) -> list[int]:
        """The ranks that `requests` draws of the stream put in an unbounded cache (each once)."""
        return sorted(set(np.random.default_rng(seed).choice(len(self.p), size=requests, p=self.p).tolist()))

    def requests(self, site: str) -> list[bytes]:
        """What run_open_loop picks from uniformly: Zipf draws (shared bytes objects, no copies)."""
        bodies = self.serialized(site)
        return [bodies[k] for k in self.draws]


def cache_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """The cache's counters between two scrapes, as shares of the items received (`model_pv_total`: refused ones
    too, which the cache counters leave out), like the stream's implied hit rate."""
    hits, misses, coalesced, received = (metric_sum(after, k) - metric_sum(before, k) for k in (
        "scoring_cache_hits_total", "scoring_cache_misses_total", "scoring_cache_coalesced_total", "model_pv_total"))
    admitted = hits + misses  # misses count coalesced items too: every admitted item not answered from the cache

    def share(x: float, of: float) -> float | None:
        return round(x / of, 4) if of else None

    return {"items_received": received, "items_admitted": admitted, "hits": hits, "coalesced": coalesced,
            "computed": misses - coalesced, "hit_rate": share(hits, received),
            "not_computed_rate": share(hits + coalesced, received), "hit_rate_of_admitted": share(hits, admitted)}


async def fetch(target: str, bodies: Sequence[bytes], timeout_s: float, group: int = 16) -> Scores:
    """Scores for each body, `group` at a time (so the server batches them with companions). A call the server sheds
    (RESOURCE_EXHAUSTED: its admission control) is retried; any other error is raised."""
    out: Scores = []
    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.unary_unary(SCORE_METHOD, request_serializer=None, response_deserializer=None)

        async def one(body: bytes) -> dict[int, float]:
            for attempt in range(20):
                try:
                    return dict(scoring_pb2.ScoreResponse.FromString(await call(body, timeout=timeout_s)).scores)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == 19:
                        raise
                    await asyncio.sleep(0.05 * (attempt + 1))
            raise AssertionError("unreachable")

        for i in range(0, len(bodies), group):
            out += await asyncio.gather(*(one(b) for b in bodies[i:i + group]))
    return out


def compare(a: Scores, b: Scores) -> dict[str, Any]:
    diffs = [abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in x]
    same_keys = all(x.keys() == y.keys() for x, y in zip(a, b, strict=True))
    return {"answers": len(a), "scores": len(diffs), "same_srcids": same_keys,
            "max_abs_diff": max(diffs) if diffs else None,
            "bit_identical_share": round(sum(d == 0.0 for d in diffs) / len(diffs), 4) if diffs else None,
            "within_tolerance": same_keys and bool(diffs) and max(diffs) <= EXACT_ATOL}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = parser(NAME, __doc__)
    ap.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent: P(rank k) ∝ k^-s")
    ap.add_argument("--stream-requests", type=int, default=6000, help="requests per cached step")
    ap.add_argument("--warm-requests", type=int, default=6000,
                    help="the cache holds what this many earlier requests put there before each step (0 = cold)")
    ap.add_argument("--seed", type=int, default=7, help="ranking and Zipf draws")
    ap.add_argument("--threads", type=int, default=0, help="ORT threads per run, engine and server (0 = the default)")
    ap.add_argument("--uncached-fractions", type=floats, default=[0.5, 0.8, 1.0], help="cache off: grid (× limit)")
    ap.add_argument("--step-s", type=float, default=10.0, help="cache off: seconds per step")
    ap.add_argument("--cached-fractions", type=floats, default=[1.0, 2.0, 3.0], help="cache on: grid (× limit)")
    ap.add_argument("--max-cached-step-s", type=float, default=40.0,
                    help="a longer cached step plays fewer requests (rate × this many seconds; a lower hit rate)")
    ap.add_argument("--max-fraction", type=float, default=8.0)
    ap.add_argument("--exact-sample", type=int, default=200, help="distinct requests checked for exactness")
    args = parse(ap, argv)
    if args.quick:
        args.uncached_fractions, args.step_s, args.cached_fractions = [0.6, 1.0], 4.0, [1.5, 3.0]
        args.stream_requests, args.warm_requests, args.max_cached_step_s, args.exact_sample = 2000, 2000, 10.0, 60
    return args


async def phases(args: argparse.Namespace, data: ModelData, limit: float, stream: Stream, sites: list[str],
                 log: Progress) -> dict[str, Any]:
    """Cache off: the rate search, then the exactness sample's reference answers. Cache on: the search with a
    steady-state cache, a cold step, the sample twice. Sites: cache off, exactness, warm-up, then one per step."""
    k, top = len(data.pairs), min(args.exact_sample // 4, len(data.pairs))
    sample = list(range(top)) + random.Random(args.seed).sample(range(top, k), min(args.exact_sample - top, k - top))
    exact_site, epochs, n, pin = sites[1], iter(sites[2:]), args.stream_requests, (args.model, data.manifest.version)
    exact_bodies = [stream.serialized(exact_site)[i] for i in sample]
    cfg = SweepConfig(limit=limit, fractions=args.uncached_fractions, step_s=args.step_s, timeout_s=args.timeout_s,
                      p99_bound_ms=args.p99_bound_ms, refine=args.refine, max_fraction=args.max_fraction,
                      max_reruns=0 if args.quick else 2)
    async with serving(args, NAME, server_flags(threads=args.threads, pin=pin), "server-cache-off.log", log,
                       "cache off") as server:
        off = {**await sweep(server, stream.requests(sites[0]), cfg, label="cache off", progress=log),
               "command": server.command}
        reference = await fetch(server.target, exact_bodies, args.timeout_s)
    cfg = dataclasses.replace(cfg, fractions=args.cached_fractions)

    async def step_at(fraction: float, warm: int = args.warm_requests) -> Step:
        site = next(epochs)
        if warm:
            keys, t0 = stream.warm_keys(warm, args.seed + len(sites) - 2 + int(fraction * 1000)), time.perf_counter()
            await fetch(server.target, [stream.serialized(site)[k] for k in keys], args.timeout_s)
            log(f"    warm-up: {len(keys):,} distinct inputs of {warm:,} draws in {time.perf_counter() - t0:.1f} s")
        # Every step the same stream length (so the same hit rate), unless that would take too long.
        step_cfg = dataclasses.replace(cfg, step_s=min(n / (fraction * limit), args.max_cached_step_s))
        before = await server.ascrape()
        step = await run_step(server, channel, stream.requests(site), fraction, step_cfg, None, log, "cache on")
        c = step["cache"] = cache_delta(before, await server.ascrape())
        sent = step["scheduled"]
        step.update(site=site, warm_requests=warm, implied_hit_rate=implied_hit_rate(stream.p, sent, warm),
                    implied_hit_rate_window=implied_hit_rate(stream.p, sent, warm, 0.2))
        log(f"    hits {c['hit_rate']}, coalesced {c['coalesced']:.0f}, not computed {c['not_computed_rate']} "
            f"(stream implies {step['implied_hit_rate']:.3f})")
        return step

    async with serving(args, NAME, server_flags(threads=args.threads, pin=pin, cache=True), "server-cache-on.log",
                       log, "cache on") as server, grpc.aio.insecure_channel(server.target) as channel:
        await warm_up(channel, stream.requests(next(epochs)), cfg)  # on a site no measured step uses
        steps = await search(step_at, cfg)
        best = max((x for x in steps if x["sustainable"]), key=lambda x: x["achieved_rate"], default=None)
        cold = None
        if best is not None and args.warm_requests:
            log(f"cold start: {best['fraction']:.2f} × limit from a cold cache (a new version after a swap)")
            cold = await step_at(best["fraction"], warm=0)
        # Exactness: fill the cache under load (answers computed in real batches), then read the sample twice.
        log(f"exactness: site {exact_site!r} at 1.0 × limit for 5 s, then {len(exact_bodies)} requests twice")
        await run_open_loop(channel, stream.requests(exact_site),
                            LoadConfig(rate=limit, duration_s=5.0, timeout_s=args.timeout_s, seed=99))
        s, passes = [await server.ascrape()], []
        for _ in range(2):
            passes.append(await fetch(server.target, exact_bodies, args.timeout_s))
            s.append(await server.ascrape())
    on = {"steps": steps, **outcome(steps, limit), "stream_requests_per_step": n, "cold_start": cold,
          "command": server.command, "cache_bytes_bound": default_cache_bytes(),
          "cache_entries_at_end": metric_sum(s[2], "scoring_cache_entries"),
          "cache_bytes_at_end": metric_sum(s[2], "scoring_cache_bytes")}
    return {"cache_off": off, "cache_on": on, "exactness": {
        "sample": len(sample), "top_ranks": top, "site": exact_site, "tolerance_abs": EXACT_ATOL,
        "cached_vs_uncached": compare(passes[1], reference), "second_vs_first": compare(passes[1], passes[0]),
        "first_pass_cache": cache_delta(s[0], s[1]), "second_pass_cache": cache_delta(s[1], s[2])}}


def measure(args: argparse.Namespace, log: Progress) -> dict[str, Any]:
    data = load_model_data(args.model_repo, args.model, args.data)
    stream = Stream(data.pairs, args.zipf_s, args.seed)
    n, w = args.stream_requests, args.warm_requests
    lengths = np.array([it.length for it in data.items])
    st = {"source": data.source, "pairs_read": data.pairs_read, "catalogue": len(data.pairs), "s": args.zipf_s,
          "seed": args.seed, "requests_per_step": n, "warm_requests": w,
          "implied_hit_rate": implied_hit_rate(stream.p, n, w),
          "implied_hit_rate_window": implied_hit_rate(stream.p, n, w, 0.2),
          "implied_hit_rate_cold": implied_hit_rate(stream.p, n),
          **{f"top{k}_share": float(stream.p[:k].sum()) for k in (1, 10, 100)},
          "tokens_mean_catalogue": float(lengths.mean()),
          "tokens_mean_stream": float((stream.p * lengths[stream.order]).sum())}
    log(f"stream: {st['catalogue']} distinct inputs ({st['source']}), Zipf s={args.zipf_s}; {n} requests per step "
        f"after {w} imply {st['implied_hit_rate']:.1%} repeats ({st['implied_hit_rate_cold']:.1%} from cold)")
    eng = engine_limit(data, args.threads, args, log)
    sites = sorted(data.encoder.sites, key=data.encoder.sites.__getitem__)  # known sites: distinct cache keys
    if len(sites) < (need := len(args.cached_fractions) + args.refine + 4):
        raise SystemExit(f"the site vocabulary has {len(sites)} entries; {need} are needed (one per step)")
    return {"stream": st, "engine": eng, **asyncio.run(phases(args, data, eng["limit"], stream, sites[:need], log))}


def main(argv: Sequence[str] | None = None) -> int:
    return run.main(parse_args(argv), NAME, measure, markdown, plot)


if __name__ == "__main__":
    raise SystemExit(main())

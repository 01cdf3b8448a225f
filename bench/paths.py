"""Sustained throughput by request path: unary Score and ScoreStream, on real pairs and on a repeating query log.

    python -m bench.paths --model-repo model_repo --out bench_out [--quick]

Two limits are measured first on the raw engine (fp32, the server's arrangement, best batch size): on the
real query/title pairs and on their queries alone. Then `python -m server` is searched for its highest
sustainable open-loop Poisson rate (no failure, ≥ 95% kept up, p99 under the bound; `bench.kit.rates`):
- real pairs, the cache off, as unary Score calls and as items over `--streams` ScoreStream calls, against the
  pairs' engine limit;
- a query-only log (the pairs' queries drawn from a Zipf law whose exponent gives about `--repeats` of the
  requests of one step as repeats), the cache on, unary and streamed, against the uncached queries' limit.
Writes <out>/paths/{results.json, section.md, paths.png} and its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.kit import run
from bench.kit.cli import Progress, floats
from bench.kit.rates import SweepConfig, sweep
from bench.kit.run import ModelData, engine_limit, load_model_data, serving
from bench.kit.server import server_flags
from bench.reports import paths as report
from loadtest.callers import STREAM_METHOD
from loadtest.openloop import SCORE_METHOD, serialize_requests
from loadtest.workload import Pair
from model_format.features import EncodedRequest
from scoring.v1 import scoring_pb2

NAME = "paths"
METHODS = {"unary": SCORE_METHOD, "stream": STREAM_METHOD}
POOL = 50_000  # the query log's length: the generator picks from it uniformly


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = run.parser(NAME, __doc__)
    ap.add_argument("--threads", type=int, default=0, help="engine arrangement (0 = lanes x 1 thread per core)")
    ap.add_argument("--step-s", type=float, default=10.0, help="seconds per step")
    ap.add_argument("--pair-fractions", type=floats, default=[0.7, 0.85, 0.95], help="pair steps, × the limit")
    ap.add_argument("--query-fractions", type=floats, default=[1.2, 1.6, 2.0], help="query-log steps, × the limit")
    ap.add_argument("--repeats", type=float, default=0.6, help="share of a step's queries that repeat one before")
    ap.add_argument("--streams", type=int, default=4, help="ScoreStream calls the items share")
    ap.add_argument("--seed", type=int, default=5)
    args = run.parse(ap, argv)
    if args.quick:
        args.step_s, args.pair_fractions, args.query_fractions = 4.0, [0.8], [1.5]
    return args


def query_data(data: ModelData) -> ModelData:
    """The pairs' queries alone, one per distinct model input."""
    inputs: dict[EncodedRequest, Pair] = {}
    for p in data.pairs:
        item = data.encoder.encode(p.query)
        inputs.setdefault(item, dataclasses.replace(p, title=""))
    return dataclasses.replace(data, pairs=list(inputs.values()), items=list(inputs))


def repeated(distinct: int, s: float, picks: int, rng: np.random.Generator) -> float:
    """Share of `picks` uniform picks from a Zipf(s) log of POOL entries that repeat an earlier pick."""
    weights = np.arange(1, distinct + 1, dtype=np.float64) ** -s
    log = rng.choice(distinct, size=POOL, p=weights / weights.sum())
    return 1.0 - len(np.unique(log[rng.integers(0, POOL, picks)])) / picks


def zipf_log(distinct: int, target: float, picks: int, seed: int) -> tuple[np.ndarray, float, float]:
    """A log of POOL ranks whose picks repeat about `target` of the time over `picks` picks: (log, s, share)."""
    lo, hi = 0.0, 3.0
    for _ in range(20):  # the repeat share grows with s: bisect
        s = (lo + hi) / 2
        share = repeated(distinct, s, picks, np.random.default_rng(seed))
        lo, hi = (s, hi) if share < target else (lo, s)
    weights = np.arange(1, distinct + 1, dtype=np.float64) ** -s
    rng = np.random.default_rng(seed)
    return rng.choice(distinct, size=POOL, p=weights / weights.sum()), s, share


def measure(args: argparse.Namespace, log: Progress) -> dict[str, Any]:
    pairs = load_model_data(args.model_repo, args.model, args.data)
    queries = query_data(pairs)
    log(f"{len(pairs.pairs)} distinct pairs and {len(queries.pairs)} distinct queries ({pairs.source})")
    results: dict[str, Any] = {"data": pairs.source, "engine": {"pairs": engine_limit(pairs, args.threads, args, log),
                                                                "queries": engine_limit(queries, args.threads, args,
                                                                                        log)}}
    pair_bodies = serialize_requests([scoring_pb2.ScoreRequest(query=p.query, title=p.title) for p in pairs.pairs])
    order = np.random.default_rng(args.seed).permutation(len(queries.pairs))  # rank -> query
    q_limit = results["engine"]["queries"]["limit"]
    picks = int(q_limit * max(args.query_fractions) * args.step_s)
    ranks, s, share = zipf_log(len(queries.pairs), args.repeats, picks, args.seed)
    query_bodies = serialize_requests([scoring_pb2.ScoreRequest(query=queries.pairs[order[r]].query) for r in ranks])
    results["query_log"] = {"distinct": len(queries.pairs), "length": POOL, "zipf_s": round(s, 3),
                            "repeats_at_top_step": round(share, 3), "picks_at_top_step": picks}
    log(f"query log: Zipf s={s:.2f} over {len(queries.pairs)} queries, {share:.0%} repeats in {picks} picks")
    pin = (args.model, int(pairs.version_dir.name))
    cases = (("pairs", False, pair_bodies, results["engine"]["pairs"]["limit"], args.pair_fractions),
             ("queries", True, query_bodies, q_limit, args.query_fractions))

    async def go() -> None:
        for case, cache, bodies, limit, fractions in cases:
            flags = server_flags(threads=args.threads, pin=pin, cache=cache)
            results.setdefault("server_flags", {})[case] = flags
            async with serving(args, NAME, flags, f"server-{case}.log", log, f"server ({case})") as server:
                for kind, method in METHODS.items():
                    cfg = SweepConfig(limit=limit, fractions=fractions, step_s=args.step_s, timeout_s=args.timeout_s,
                                      p99_bound_ms=args.p99_bound_ms, refine=args.refine, method=method,
                                      streams=args.streams, max_reruns=0 if args.quick else 1)
                    results.setdefault(case, {})[kind] = await sweep(server, bodies, cfg, label=f"{case} {kind}",
                                                                     progress=log)

    asyncio.run(go())
    return results


def main(argv: Sequence[str] | None = None) -> int:
    return run.main(parse_args(argv), NAME, measure, report.markdown, report.plot)


if __name__ == "__main__":
    raise SystemExit(main())

"""Sustained throughput by request path: unary Score and ScoreStream, on real pairs and on a repeating query log.

    python -m bench.paths --model-repo model_repo --out bench_out [--quick]

Two limits are measured first on the raw engine (fp32, the server's arrangement, best batch size): on the
real query/title pairs and on their queries alone. Then `python -m server` is searched for its highest
sustainable open-loop Poisson rate (no failure, ≥ 95% kept up, p99 under the bound; `bench.kit.rates`):
- real pairs, the cache off, as unary Score calls and as items over `--streams` ScoreStream calls, against the
  pairs' engine limit;
- a query-only log shaped like a search log, a popular head and a long tail: `--repeats` of its requests are
  drawn from the pairs' distinct queries by a Zipf law (s = `--zipf-s`), the rest are queries seen once (a
  query from the pairs with a number of its own appended), so about that share of the requests can be served
  from the cache whatever the rate and however long the run; the cache on, unary and streamed, against the
  uncached engine on the log's first 5,000 distinct queries (head and tail as the log mixes them).
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
POOL = 500_000  # the query log's length: the generator picks from it uniformly


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = run.parser(NAME, __doc__)
    ap.add_argument("--threads", type=int, default=0, help="engine arrangement (0 = lanes x 1 thread per core)")
    ap.add_argument("--step-s", type=float, default=10.0, help="seconds per step")
    ap.add_argument("--pair-fractions", type=floats, default=[0.7, 0.85, 0.95], help="pair steps, × the limit")
    ap.add_argument("--query-fractions", type=floats, default=[1.2, 1.6, 2.0], help="query-log steps, × the limit")
    ap.add_argument("--repeats", type=float, default=0.6, help="share of the query log drawn from its popular head")
    ap.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent of the head: P(rank k) ∝ k^-s")
    ap.add_argument("--streams", type=int, default=4, help="ScoreStream calls the items share")
    ap.add_argument("--seed", type=int, default=5)
    args = run.parse(ap, argv)
    if args.quick:
        args.step_s, args.pair_fractions, args.query_fractions = 4.0, [0.8], [1.5]
    return args


def query_data(data: ModelData, queries: Sequence[str], limit: int = 5000) -> ModelData:
    """The first `limit` distinct model inputs among `queries` (as the log has them: head and tail mixed)."""
    inputs: dict[EncodedRequest, Pair] = {}
    for q in queries:
        inputs.setdefault(data.encoder.encode(q), Pair(q, ""))
        if len(inputs) >= limit:
            break
    return dataclasses.replace(data, pairs=list(inputs.values()), items=list(inputs))


def query_log(queries: Sequence[str], repeats: float, s: float, seed: int) -> list[str]:
    """POOL queries: a `repeats` share drawn from `queries` by Zipf(s) over a random ranking, the rest each
    unique. The generator picks uniformly from the log, so a tail entry comes back only as often as POOL is
    small against a run's picks (under 10% of a full run's)."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, len(queries) + 1, dtype=np.float64) ** -s
    head = rng.permutation(len(queries))[rng.choice(len(queries), size=POOL, p=weights / weights.sum())]
    tail = rng.random(POOL) >= repeats
    return [f"{queries[int(h)]} {i}" if t else queries[int(h)] for i, (h, t) in enumerate(zip(head, tail, strict=True))]


def measure(args: argparse.Namespace, log: Progress) -> dict[str, Any]:
    pairs = load_model_data(args.model_repo, args.model, args.data)
    head = list(dict.fromkeys(p.query for p in pairs.pairs))
    log_queries = query_log(head, args.repeats, args.zipf_s, args.seed)
    queries = query_data(pairs, log_queries)
    log(f"{len(pairs.pairs)} distinct pairs; a query log of {POOL} requests, {args.repeats:.0%} drawn from their "
        f"{len(head)} distinct queries by Zipf s={args.zipf_s}, the rest seen once ({pairs.source})")
    results: dict[str, Any] = {"data": pairs.source, "engine": {"pairs": engine_limit(pairs, args.threads, args, log),
                                                                "queries": engine_limit(queries, args.threads, args,
                                                                                        log)}}
    pair_bodies = serialize_requests([scoring_pb2.ScoreRequest(query=p.query, title=p.title) for p in pairs.pairs])
    q_limit = results["engine"]["queries"]["limit"]
    query_bodies = serialize_requests([scoring_pb2.ScoreRequest(query=q) for q in log_queries])
    results["query_log"] = {"distinct_head": len(head), "length": POOL, "zipf_s": args.zipf_s,
                            "repeats": args.repeats, "distinct": len(set(log_queries)),
                            "engine_sample": len(queries.items)}
    pin = (args.model, int(pairs.version_dir.name))
    cases = (("pairs", False, pair_bodies, results["engine"]["pairs"]["limit"], args.pair_fractions),
             ("queries", True, query_bodies, q_limit, args.query_fractions))

    async def go() -> None:
        for case, cache, bodies, limit, fractions in cases:
            flags = server_flags(threads=args.threads, pin=pin, cache=cache)
            results.setdefault("server_flags", {})[case] = flags
            for kind, method in METHODS.items():  # a fresh server each: neither path inherits a warm cache
                cfg = SweepConfig(limit=limit, fractions=fractions, step_s=args.step_s, timeout_s=args.timeout_s,
                                  p99_bound_ms=args.p99_bound_ms, refine=args.refine, method=method,
                                  streams=args.streams, max_reruns=0 if args.quick else 1)
                async with serving(args, NAME, flags, f"server-{case}-{kind}.log", log, f"server ({case})") as server:
                    results.setdefault(case, {})[kind] = await sweep(server, bodies, cfg, label=f"{case} {kind}",
                                                                     progress=log)

    asyncio.run(go())
    return results


def main(argv: Sequence[str] | None = None) -> int:
    return run.main(parse_args(argv), NAME, measure, report.markdown, report.plot)


if __name__ == "__main__":
    raise SystemExit(main())

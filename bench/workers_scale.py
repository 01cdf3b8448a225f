"""python -m bench.workers_scale --model-repo model_repo --out bench_out [--quick]

Throughput against `--workers N` on this machine: for each configuration (N workers × T intra-op threads per worker),
the max sustained throughput (result cache off) under open-loop Poisson load and p99 at one fixed load, against the
raw engine limit measured in the same run. SO_REUSEPORT spreads *connections* over the workers, not calls: the load
generator opens connections until each worker holds as many (each worker's /metrics says which one answered) and
sends the calls round-robin over them, as a load balancer with many clients would.

Writes <out>/workers_scale/{results.json, section.md, workers_scale.png} and its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from collections.abc import Callable, Sequence
from typing import Any, cast

import grpc

from bench.kit import run
from bench.kit.cli import Progress, floats
from bench.kit.rates import Step, SweepConfig, outcome, run_step, search, warm_up
from bench.kit.run import ModelData, engine_limit, load_model_data, parse, parser, serving
from bench.kit.scrape import metric_sum
from bench.kit.server import ServerProcess, server_flags
from bench.reports.workers_scale import markdown, plot
from loadtest.openloop import SCORE_METHOD
from scoring.v1 import scoring_pb2
from server.resources import cpu_limit

NAME = "workers_scale"
PV = "model_pv_total"


def configs(text: str) -> list[tuple[int, int]]:
    """'1:2,2:1,2:0' -> [(workers, threads per worker)]; 0 threads = the server's default."""
    return [(int(n), int(t or 0)) for n, _, t in (p.partition(":") for p in text.split(",") if p.strip())]


class SpreadChannel:
    """What run_open_loop uses of a channel (`unary_unary`), the calls spread over several connections in turn."""

    def __init__(self, channels: Sequence[grpc.aio.Channel]) -> None:
        self.channels = list(channels)

    def unary_unary(self, method: str, request_serializer: Any = None,
                    response_deserializer: Any = None) -> Callable[..., Any]:
        calls = itertools.cycle([ch.unary_unary(method, request_serializer=request_serializer,
                                                response_deserializer=response_deserializer) for ch in self.channels])
        return lambda request, **kwargs: next(calls)(request, **kwargs)


async def balanced_channels(group: ServerProcess, per_worker: int, body: bytes, timeout_s: float
                            ) -> tuple[list[grpc.aio.Channel], list[int]]:
    """Opens connections until every worker holds `per_worker` of them (or 30 tries per wanted one)."""
    held: dict[int, list[grpc.aio.Channel]] = {i: [] for i in range(group.spec.workers)}
    for _ in range(30 * per_worker * group.spec.workers):
        if all(len(v) >= per_worker for v in held.values()):
            break
        # A local subchannel pool: this channel gets its own TCP connection, not a shared one.
        ch = grpc.aio.insecure_channel(group.target, options=[("grpc.use_local_subchannel_pool", 1)])
        before = [metric_sum(v, PV) for v in await asyncio.to_thread(group.scrape_each)]
        await ch.unary_unary(SCORE_METHOD, request_serializer=None, response_deserializer=None)(body, timeout=timeout_s)
        after = [metric_sum(v, PV) for v in await asyncio.to_thread(group.scrape_each)]
        worker = max(range(group.spec.workers), key=lambda i: after[i] - before[i])
        if len(held[worker]) < per_worker:
            held[worker].append(ch)
        else:
            await ch.close()
    # Interleaved, so round-robin alternates workers call by call.
    return [ch for g in itertools.zip_longest(*held.values()) for ch in g if ch is not None], \
        [len(v) for v in held.values()]


async def run_config(args: argparse.Namespace, data: ModelData, limit: float, requests: list[bytes], workers: int,
                     threads: int, log: Progress) -> dict[str, Any]:
    label = f"{workers} worker(s) × {threads or 'default'} thread(s)"
    # T threads: one batch of T threads at a time per worker; default: its share of the cores as one-thread lanes.
    exact = ["--intra-op-threads", str(threads), "--engine-lanes", "1"] if threads else []
    flags = server_flags(threads=None, pin=(args.model, data.manifest.version), extra=exact)
    cfg = SweepConfig(limit=limit, fractions=sorted({*args.fractions, args.fixed_fraction}), step_s=args.step_s,
                      timeout_s=args.timeout_s, p99_bound_ms=args.p99_bound_ms, refine=args.refine,
                      max_fraction=args.max_fraction)
    log_name = f"server-{workers}w-{threads or 'default'}t.log"
    async with serving(args, NAME, flags, log_name, log, label, workers=workers) as group:
        channels, counts = await balanced_channels(group, args.connections_per_worker, requests[0], args.timeout_s)
        log(f"  connections per worker: {counts}")
        spread = cast(grpc.aio.Channel, SpreadChannel(channels))  # duck-typed: run_open_loop calls unary_unary

        async def measure(fraction: float) -> Step:
            before = await asyncio.to_thread(group.scrape_each)
            step = await run_step(group, spread, requests, fraction, cfg, None, log, label)
            after = await asyncio.to_thread(group.scrape_each)
            items = step["per_worker_items"] = [metric_sum(x, PV) - metric_sum(y, PV)
                                                for x, y in zip(after, before, strict=True)]
            log(f"    calls per worker {[int(x) for x in items]}")
            return step

        await warm_up(spread, requests, cfg)
        steps = await search(measure, cfg)
        for ch in channels:
            await ch.close()
    lanes = 1 if threads else max(1, cpu_limit() // workers)
    return {"workers": workers, "threads_per_worker": threads or 1, "threads_flag": threads, "lanes_per_worker": lanes,
            "total_threads": workers * (threads or lanes), "connections_per_worker": counts,
            "start_seconds": round(group.start_seconds, 1), "command": group.command, "steps": steps,
            **outcome(steps, limit),
            "fixed_load_step": next(s for s in steps if abs(s["fraction"] - args.fixed_fraction) < 1e-9)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = parser(NAME, __doc__)
    ap.add_argument("--configs", type=configs, default=configs("1:0,1:2,2:1,2:0,3:1"), help="workers:threads, ... "
                    "(threads 0 = the default: one-thread lanes; duplicates skipped; the first is the baseline)")
    ap.add_argument("--fixed-fraction", type=float, default=0.6, help="the load (× limit) every p99 is read at")
    ap.add_argument("--fractions", type=floats, default=[0.9], help="more grid steps (fractions of the limit)")
    ap.add_argument("--max-fraction", type=float, default=3.0)
    ap.add_argument("--step-s", type=float, default=8.0)
    ap.add_argument("--connections-per-worker", type=int, default=2)
    ap.add_argument("--engine-threads", type=int, default=0, help="raw engine threads per run (0 = one-thread lanes)")
    args = parse(ap, argv)
    if args.quick:
        args.configs, args.fractions, args.step_s = configs("1:0,1:2,2:1"), [1.0], 4.0
    return args


def measure(args: argparse.Namespace, log: Progress) -> dict[str, Any]:
    data = load_model_data(args.model_repo, args.model, args.data)
    requests = [scoring_pb2.ScoreRequest(query=p.query, title=p.title or None).SerializeToString() for p in data.pairs]
    eng = engine_limit(data, args.engine_threads, args, log)
    seen: set[tuple[int, int]] = set()
    runs, skipped = [], []
    for workers, threads in args.configs:
        lanes = max(1, cpu_limit() // workers)  # the default's one-thread lanes per worker
        effective = (workers, threads) if threads else (workers, 1 if lanes == 1 else -lanes)
        if effective in seen:
            skipped.append(f"{workers}:{threads}")
            continue
        seen.add(effective)
        runs.append(asyncio.run(run_config(args, data, eng["limit"], requests, workers, threads, log)))
    return {"data": {"source": data.source, "distinct_inputs": len(data.pairs)}, "engine": eng, "configs": runs,
            "skipped": skipped, "default_threads": cpu_limit()}


def main(argv: Sequence[str] | None = None) -> int:
    return run.main(parse_args(argv), NAME, measure, markdown, plot)


if __name__ == "__main__":
    raise SystemExit(main())

"""Per-call CPU of the server's front end against the gRPC floor, at the same concurrency, unary and streamed.

    python -m bench.percall --model-repo model_repo --out bench_out [--concurrency 64]

Closed loops of `--concurrency` callers (each sends its next request when the last is answered), first against
the transport floor (`bench.peers.canned_server`: a grpc.aio server on uvloop that decodes each request and
answers a canned response of the same size, unary and on ScoreStream), then against `python -m server`:
cache hits (a few distinct pairs, cache on), misses on real query/title pairs and misses on their queries
alone (cache off). Each case runs unary `Score` calls, then the same items over `--streams` ScoreStream calls
(`scoring_client.StreamingScorer`). Measured: the CPU seconds of the server's event-loop thread (the main
thread; the engine's lanes run on their own threads) and of the whole server process per answered call, and
the load generator's. The floor falls as concurrency rises (each wake-up serves more calls), so it is measured
here at the concurrency of the load it is compared with, in the same run; misses run at the engine's pace, so
their floor is also measured at their own rate (the canned server answering after the matching delay).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from typing import Any

import grpc

from bench.kit import run
from bench.kit.cli import Progress, add_model_args, add_publish_args, new_parser
from bench.kit.data import REPO_ROOT, load_pairs, newest_version
from bench.kit.machine import process_cpu_seconds
from bench.kit.server import ServerProcess, server_flags
from bench.peers.procs import PeerProcess
from bench.reports import percall as report
from loadtest.callers import STREAM_METHOD
from loadtest.closedloop import ClosedLoopConfig, run_closed_loop
from loadtest.openloop import SCORE_METHOD, serialize_requests
from scoring.v1 import scoring_pb2

NAME = "percall"
METHODS = {"unary": SCORE_METHOD, "stream": STREAM_METHOD}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = new_parser(NAME, __doc__)
    add_model_args(ap)
    ap.add_argument("--concurrency", type=int, default=64, help="calls in flight (closed loop)")
    ap.add_argument("--duration-s", type=float, default=8.0, help="measured seconds per case and method")
    ap.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured seconds before each")
    ap.add_argument("--streams", type=int, default=4, help="ScoreStream calls the items share")
    ap.add_argument("--hits", type=int, default=32, help="distinct pairs in the cache-hit workload")
    ap.add_argument("--threads", type=int, default=0, help="engine arrangement (0 = lanes x 1 thread per core)")
    ap.add_argument("--server-cwd", default=REPO_ROOT)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 s per case")
    add_publish_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.duration_s, args.warmup_s = 2.0, 0.5
    return args


async def measure_case(target: str, pid: int, requests: list[bytes], method: str,
                       args: argparse.Namespace) -> dict[str, Any]:
    """One closed loop, warmed first: rates, latency and CPU per answered call."""
    def config(duration_s: float) -> ClosedLoopConfig:
        return ClosedLoopConfig(concurrency=args.concurrency, duration_s=duration_s, timeout_s=args.timeout_s,
                                warmup_s=0.0, method=method, streams=args.streams)

    async with grpc.aio.insecure_channel(target) as channel:
        await run_closed_loop(channel, requests, config(args.warmup_s))
        loop0, proc0, client0 = process_cpu_seconds(pid, pid), process_cpu_seconds(pid), time.process_time()
        result = await run_closed_loop(channel, requests, config(args.duration_s))
        loop1, proc1, client1 = process_cpu_seconds(pid, pid), process_cpu_seconds(pid), time.process_time()
    summary = result.summary()
    calls = len(result.codes)

    def per_call(seconds: float) -> float | None:
        return round(seconds / calls * 1e6, 1) if calls else None

    return {"calls": calls, "ok": summary["ok"], "failures": summary["failures"],
            "calls_per_s": round(calls / result.wall_s, 1), "p50_ms": summary["latency"]["p50_ms"],
            "p99_ms": summary["latency"]["p99_ms"], "loop_us": per_call(loop1 - loop0),
            "process_us": per_call(proc1 - proc0), "client_us": per_call(client1 - client0)}


async def measure_server(target: str, pid: int, requests: list[bytes], args: argparse.Namespace,
                         log: Progress, label: str, kinds: Sequence[str] = tuple(METHODS)) -> dict[str, Any]:
    out = {}
    for kind in kinds:
        method = METHODS[kind]
        out[kind] = row = await measure_case(target, pid, requests, method, args)
        log(f"  {label} {kind}: {row['calls_per_s']}/s, event loop {row['loop_us']} us/call, process "
            f"{row['process_us']} us/call, generator {row['client_us']} us/call, failures {row['failures'] or 0}")
    return out


def measure(args: argparse.Namespace, log: Progress) -> dict[str, Any]:
    version_dir = newest_version(args.model_repo, args.model)
    pairs = load_pairs(args.data)
    both = serialize_requests([scoring_pb2.ScoreRequest(query=p.query, title=p.title) for p in pairs.pairs])
    queries = serialize_requests([scoring_pb2.ScoreRequest(query=p.query) for p in pairs.pairs])
    hits = both[:args.hits]
    log(f"{len(both)} pairs ({pairs.described}); closed loops of {args.concurrency}, {args.duration_s:g} s each")
    results: dict[str, Any] = {"data": pairs.described, "version_dir": str(version_dir), "cases": {}}

    async def floor_at(delay_ms: float, kinds: Sequence[str], label: str) -> dict[str, Any]:
        floor = PeerProcess("canned_server", ["--version-dir", str(version_dir), "--delay-ms", f"{delay_ms:.3f}"],
                            both[0], args.out / NAME / "canned.log")
        await asyncio.to_thread(floor.start)
        try:
            return await measure_server(floor.target, floor.pid, both, args, log, label, kinds)
        finally:
            await asyncio.to_thread(floor.stop)

    async def go() -> None:
        results["floor"] = await floor_at(0.0, list(METHODS), "floor")
        pin = (args.model, int(version_dir.name))
        for cache, cases in ((True, {"hit": hits}), (False, {"miss_pairs": both, "miss_queries": queries})):
            flags = server_flags(threads=args.threads, pin=pin, cache=cache)
            async with run.serving(args, NAME, flags, f"server-cache-{'on' if cache else 'off'}.log", log,
                                   "server") as server:
                for case, requests in cases.items():
                    results["cases"][case] = await measure_server(server.target, _pid(server), requests, args,
                                                                  log, case)
        results["server_flags"] = server_flags(threads=args.threads, pin=pin)
        # A miss runs at the engine's pace: the floor at that same rate answers each call after the wait that
        # gives the same rate with the same number of callers (Little's law).
        for case in ("miss_pairs", "miss_queries"):
            for kind in METHODS:
                rate = results["cases"][case][kind]["calls_per_s"]
                delay_ms = max(0.0, args.concurrency / rate * 1000.0 - results["floor"][kind]["p50_ms"])
                at = await floor_at(delay_ms, [kind], f"floor at the {case} rate")
                results["cases"][case][kind]["floor_same_rate"] = {**at[kind], "delay_ms": round(delay_ms, 1)}

    asyncio.run(go())
    return results


def _pid(server: ServerProcess) -> int:
    return server.worker_pids()[0]


def main(argv: Sequence[str] | None = None) -> int:
    return run.main(parse(argv), NAME, measure, report.markdown, report.plot)


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m loadtest`: command line, runs, progress lines and the output folder."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from loadtest.callers import STREAM_METHOD
from loadtest.closedloop import ClosedLoopConfig, run_closed_loop
from loadtest.openloop import SCORE_METHOD, LoadConfig, RunResult, run_open_loop, serialize_requests
from loadtest.sweep import KEEP_UP, find_max_rate
from loadtest.workload import Workload, WorkloadError, load_workload, synthetic_workload

RESULT_JSON = "result.json"
DEFAULT_SYNTHETIC = 2000
# host:port, [ipv6]:port; grpc's own schemes (dns:, unix:, ipv4:, ipv6:) are passed through as they are.
TARGET_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")

DESCRIPTION = """\
Load generator for the scoring service (any gRPC unary method that takes the workload's ScoreRequest).

Modes:
  open loop (default)    requests leave at scheduled times, Poisson (or --arrival constant) at --rate
                         per second for --duration seconds, whatever the server does; latency counts
                         from the scheduled send, so queueing is never hidden (no coordinated omission)
  closed loop            --concurrency C: C workers, each sending its next request when the previous
                         one answers; the rate follows the server
  sweep                  --sweep --p99-objective-ms X: open-loop steps of --duration seconds from --rate
                         upwards (x2 while sustainable, then --refine bisection steps) to find the
                         highest offered rate with every call OK, achieved >= 95% of offered and p99 <= X

Workload: --workload FILE.jsonl (one object per line: query [required], title, site, ner [list of
strings], industry; other keys ignored; rows without a query skipped) or --synthetic N (random
Chinese text shaped like real search pairs: ~34 tokens per pair, p99 ~80, plus site/NER/industry).
Requests are built and serialized before the clock starts.

Output (--out DIR): result.json (offered rate = calls sent per second; achieved rate = OK answers
per second inside the window from --window-start to the end of sending; OK count and failures by
gRPC status code name; latency of OK calls p50/p90/p99/p99.9/max; the generator's own CPU use in
cores, which matters when it shares the machine with the server; the workload's shape) and PNG plots:
latency_histogram.png for a run; sweep.png (p50/p99 and achieved throughput against offered load)
for a sweep. Progress lines go to stderr.
"""

EPILOG = """\
examples:
  python -m loadtest --target localhost:50051 --rate 100 --duration 30 --out out/open
  python -m loadtest --target localhost:50051 --concurrency 8 --duration 30 --workload pairs.jsonl --out out/closed
  python -m loadtest --target localhost:50051 --sweep --p99-objective-ms 50 --rate 20 --duration 10 --out out/sweep
  python -m loadtest --target proxy:9000 --metadata application=scoring --rate 50 --duration 20 --out out/ray

exit status: 0 when the run completed (failed calls are reported, not fatal), 1 when the target
cannot be reached or the workload cannot be read, 2 for bad arguments.
"""


class UsageError(Exception):
    """Bad input found after parsing (unreachable target, unreadable workload): exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", metavar="HOST:PORT", required=True, help="HOST:PORT of the gRPC server (plaintext)")
    p.add_argument("--rate", metavar="R", type=_positive, default=None,
                   help="open loop: offered requests/s; sweep: the first step's rate (default 10)")
    p.add_argument("--duration", metavar="S", type=_positive, default=10.0,
                   help="seconds of sending per run, or per step in a sweep (default 10)")
    p.add_argument("--concurrency", type=int, default=None, metavar="C",
                   help="closed loop with C workers instead of an open loop")
    p.add_argument("--arrival", choices=("poisson", "constant"), default="poisson",
                   help="open loop: exponential gaps (default) or constant spacing")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workload", type=Path, metavar="FILE.jsonl", help="requests from a JSONL file")
    src.add_argument("--synthetic", type=int, metavar="N",
                     help=f"N synthetic requests (the default, with N = {DEFAULT_SYNTHETIC})")
    p.add_argument("--max-requests", type=int, default=None, metavar="N",
                   help="use at most the first N rows of --workload")
    p.add_argument("--method", metavar="/PKG.SERVICE/METHOD", default=SCORE_METHOD,
                   help=f"full gRPC method name (default {SCORE_METHOD}); {STREAM_METHOD} sends each request as "
                        "an item on --streams bidirectional streams, its answer's status counted as a call's")
    p.add_argument("--streams", type=int, default=4, metavar="N",
                   help="ScoreStream calls the items share (with --method .../ScoreStream; default 4)")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="metadata sent with every call, repeatable (e.g. application=scoring for Ray Serve's "
                        "gRPC proxy); keys are lower-cased; values never reach result.json")
    p.add_argument("--timeout", metavar="S", type=_positive, default=10.0,
                   help="per-call deadline in seconds (default 10)")
    p.add_argument("--warmup", metavar="S", type=float, default=2.0,
                   help="seconds of unmeasured load before measuring (default 2; 0 = none)")
    p.add_argument("--window-start", metavar="S", type=float, default=None,
                   help="seconds into the run where the achieved-rate window starts (default 20%% of --duration)")
    p.add_argument("--connect-timeout", metavar="S", type=_positive, default=10.0,
                   help="seconds to wait for the connection before giving up (default 10)")
    p.add_argument("--seed", metavar="N", type=int, default=0, help="arrival times, request picks, synthetic text")
    p.add_argument("--sweep", action="store_true", help="search for the max sustainable rate (see above)")
    p.add_argument("--p99-objective-ms", metavar="MS", type=_positive, default=None,
                   help="sweep: the p99 latency objective")
    p.add_argument("--refine", metavar="N", type=int, default=4,
                   help="sweep: bisection steps after the grid (default 4)")
    p.add_argument("--max-rate", metavar="R", type=_positive, default=None, help="sweep: never offer more than this")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created)")
    return p


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def parse_metadata(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """KEY=VALUE strings as gRPC metadata; gRPC requires lower-case keys, so they are lower-cased here."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise ValueError(f"--metadata expects KEY=VALUE, got {item!r}")
        if not re.fullmatch(r"[0-9a-z_.-]+", key):
            raise ValueError(f"--metadata key {key!r}: only 0-9 a-z _ . - are allowed")
        if key.endswith("-bin"):
            raise ValueError(f"--metadata key {key!r}: binary (-bin) metadata is not supported")
        out.append((key, value))
    return tuple(out)


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations argparse cannot express; p.error exits with status 2."""
    if not (TARGET_RE.match(args.target) or re.match(r"^(dns|unix|unix-abstract|ipv4|ipv6):", args.target)):
        p.error(f"--target must be HOST:PORT, got {args.target!r}")
    if args.sweep:
        if args.p99_objective_ms is None:
            p.error("--sweep needs --p99-objective-ms")
        if args.concurrency is not None:
            p.error("--sweep searches over offered rate (open loop); it does not combine with --concurrency")
    elif args.p99_objective_ms is not None:
        p.error("--p99-objective-ms is only used with --sweep")
    if args.concurrency is not None:
        if args.concurrency < 1:
            p.error("--concurrency must be at least 1")
        if args.rate is not None:
            p.error("--rate and --concurrency exclude each other (open or closed loop)")
    elif args.rate is None and not args.sweep:
        p.error("an open-loop run needs --rate (or --concurrency for a closed loop)")
    if args.synthetic is not None and args.synthetic < 1:
        p.error("--synthetic must be at least 1")
    if args.max_requests is not None and (args.max_requests < 1 or args.workload is None):
        p.error("--max-requests needs --workload and must be at least 1")
    if args.refine < 0:
        p.error("--refine must be >= 0")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.window_start is not None and not 0 <= args.window_start < args.duration:
        p.error("--window-start must be in [0, --duration)")
    try:
        args.metadata = parse_metadata(args.metadata)
    except ValueError as exc:
        p.error(str(exc))


class Progress:
    """Progress lines on stderr, stamped with seconds since the tool started."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, line: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {line}", file=sys.stderr, flush=True)

    def sending(self, label: str, duration_s: float) -> Callable[[float], None]:
        def report(fraction: float) -> None:
            self(f"{label}: {fraction:4.0%} of {duration_s:g} s sent")
        return report


def get_workload(args: argparse.Namespace) -> Workload:
    if args.workload is not None:
        return load_workload(args.workload, args.max_requests)
    return synthetic_workload(args.synthetic or DEFAULT_SYNTHETIC, seed=args.seed + 7)


async def connect(target: str, timeout_s: float) -> grpc.aio.Channel:
    channel = grpc.aio.insecure_channel(target)
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout_s)
    except TimeoutError:
        await channel.close()
        raise UsageError(f"cannot connect to {target} within {timeout_s:g} s (is a plaintext gRPC server "
                         "listening there?)") from None
    return channel


def one_line(summary: dict[str, Any]) -> str:
    lat = summary["latency"]
    fails = ", ".join(f"{k} {v}" for k, v in summary["failures"].items()) or "none"

    def ms(key: str) -> str:
        return f"{lat[key]:.1f}" if lat[key] is not None else "-"

    return (f"offered {summary['offered_rate']:.1f}/s, achieved {summary['achieved_rate']:.1f}/s, "
            f"OK {summary['ok']}/{summary['scheduled']}, failures: {fails}; latency ms p50 {ms('p50_ms')} "
            f"p90 {ms('p90_ms')} p99 {ms('p99_ms')} p99.9 {ms('p99.9_ms')} max {ms('max_ms')}; "
            f"generator {summary['generator_cpu_cores']} cores")


async def run(args: argparse.Namespace, say: Progress) -> dict[str, Any]:
    """Does the run the arguments ask for, writes DIR's files and returns what went into result.json."""
    workload = get_workload(args)
    requests = serialize_requests(workload.requests)
    say(f"workload: {workload.source}, {len(requests)} requests" +
        (f" ({workload.skipped} rows without a query skipped)" if workload.skipped else ""))
    doc: dict[str, Any] = {
        "tool": "python -m loadtest",
        "started_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "target": args.target,
        "method": args.method,
        "metadata_keys": [k for k, _ in args.metadata],  # values may be credentials
        "generator_host": {"logical_cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
        "workload": workload.describe(),
    }
    say(f"connecting to {args.target}")
    channel = await connect(args.target, args.connect_timeout)
    # matplotlib takes a second to import: only once the workload and the target are known to be good.
    from loadtest.plots import HISTOGRAM_PNG, SWEEP_PNG, plot_latency_histogram, plot_sweep

    try:
        args.out.mkdir(parents=True, exist_ok=True)  # only now: a run that cannot start leaves no empty folder
    except OSError as exc:
        await channel.close()
        raise UsageError(f"cannot create the output folder {args.out}: {exc.strerror}") from None
    async with channel:
        if args.sweep:
            doc["mode"] = "sweep"
            say(f"sweep: p99 objective {args.p99_objective_ms:g} ms, steps of {args.duration:g} s from "
                f"{args.rate or 10.0:g}/s, keep-up {KEEP_UP:.0%}")
            found = await find_max_rate(
                channel, requests, p99_objective_ms=args.p99_objective_ms, start_rate=args.rate or 10.0,
                step_s=args.duration, timeout_s=args.timeout, refine=args.refine, metadata=args.metadata,
                method=args.method, arrival=args.arrival, max_rate=args.max_rate, warmup_s=args.warmup,
                streams=args.streams,
                seed=args.seed, progress=say)
            doc["sweep"] = found
            doc["plots"] = [plot_sweep(found, args.out / SWEEP_PNG, f"{args.target} {args.method}").name]
            say(f"max sustainable rate: {found['max_rate']:g}/s offered ({found['max_achieved_rate']:g}/s achieved, "
                f"p99 {found['p99_at_max_ms']} ms)" + ("" if found["bracketed"] or not found["max_rate"]
                                                       else "; every step passed: a lower bound"))
        else:
            result = await measured_run(channel, requests, args, say)
            summary = result.summary()
            doc["mode"] = summary["mode"]
            doc["summary"] = summary
            title = (f"{args.target}: {summary['mode']} loop, "
                     + (f"{args.rate:g}/s {args.arrival}" if args.concurrency is None
                        else f"concurrency {args.concurrency}") + f", {args.duration:g} s")
            doc["plots"] = [plot_latency_histogram(result.ok_latencies(), summary, args.out / HISTOGRAM_PNG,
                                                   title).name]
            say(one_line(summary))
    (args.out / RESULT_JSON).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    say(f"wrote {args.out / RESULT_JSON} and {', '.join(doc['plots'])}")
    return doc


async def measured_run(channel: grpc.aio.Channel, requests: list[bytes], args: argparse.Namespace,
                       say: Progress) -> RunResult[Any]:
    if args.concurrency is not None:
        def closed(duration_s: float, seed: int, window: float | None) -> ClosedLoopConfig:
            return ClosedLoopConfig(concurrency=args.concurrency, duration_s=duration_s, timeout_s=args.timeout,
                                    warmup_s=window, method=args.method, seed=seed, metadata=args.metadata,
                                    streams=args.streams)
        if args.warmup > 0:
            say(f"warm-up: {args.warmup:g} s, {args.concurrency} workers (not measured)")
            warm = await run_closed_loop(channel, requests, closed(args.warmup, args.seed + 1, None))
            _warn_warmup(warm, say)
        say(f"closed loop: {args.concurrency} workers for {args.duration:g} s")
        return await run_closed_loop(channel, requests, closed(args.duration, args.seed, args.window_start),
                                     on_progress=say.sending("closed loop", args.duration))

    def open_(duration_s: float, seed: int, window: float | None) -> LoadConfig:
        return LoadConfig(rate=args.rate, duration_s=duration_s, arrival=args.arrival, timeout_s=args.timeout,
                          warmup_s=window, method=args.method, seed=seed, metadata=args.metadata,
                          streams=args.streams)
    if args.warmup > 0:
        say(f"warm-up: {args.warmup:g} s at {args.rate:g}/s (not measured)")
        _warn_warmup(await run_open_loop(channel, requests, open_(args.warmup, args.seed + 1, None)), say)
    say(f"open loop: {args.rate:g}/s {args.arrival} for {args.duration:g} s")
    return await run_open_loop(channel, requests, open_(args.duration, args.seed, args.window_start),
                               on_progress=say.sending("open loop", args.duration))


def _warn_warmup(result: RunResult[Any], say: Progress) -> None:
    if result.failures:
        say(f"warm-up had failures: {result.failures} (first of them might just be a cold server)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    say = Progress()
    try:
        asyncio.run(run(args, say))
    except (UsageError, WorkloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0

"""python -m bench.compare --model-repo model_repo --out bench_out [--quick] [--p99-objective-ms MS]

This service against its peers (`bench/peers/`: a naive gRPC server, one ORT run per call; Seldon MLServer with
its adaptive batching, over Open Inference Protocol gRPC; Lightning LitServe with its batching, over HTTP/JSON; Ray
Serve with `@serve.batch`) on the same fp32 graph, tokenizer, ORT threads, machine and query/title pairs: first the raw
engine alone (the ceiling) and the transport floor (the raw engine beside a canned-answer gRPC server carrying
90% of its rate), then each server's max rate under p99 ≤ the objective (`loadtest.sweep.find_max_rate`, open-loop
Poisson), then all at one fixed rate for p50/p99, CPU and memory. Writes <out>/compare/{results.json, section.md,
compare.png, *.log} and its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import grpc

from bench.kit.cli import add_common_args, ints, logger, new_parser
from bench.kit.data import REPO_ROOT, load_pairs, newest_version
from bench.kit.engine import Engine, Workload, load_engine, make_workload, probe, throughput_sweep
from bench.kit.machine import CpuMonitor, arrangement, machine, tree_memory_mib, wait_idle
from bench.kit.publish import publish
from bench.kit.server import ServerProcess, ServerSpec, server_flags
from bench.peers.procs import PeerProcess, package_version
from bench.peers.wire import LITSERVE_PATH, OIP_METHOD, for_protocol
from bench.reports import compare as report
from loadtest.openloop import SCORE_METHOD, LoadConfig, run_open_loop, serialize_requests
from loadtest.sweep import find_max_rate, judge
from model_format.features import FeatureEncoder, FeatureError
from model_format.manifest import read_manifest
from scoring.v1 import scoring_pb2

NAME = "compare"
RAY_APP = "scoring"  # bench.peers.ray_peer.APP_NAME (not imported: that module imports ray)
SYSTEMS = ("naive", "service", "mlserver", "litserve", "ray")
MLSERVER_PYTHON = REPO_ROOT / ".venv-mlserver" / "bin" / "python"  # its own environment (requirements-mlserver.txt)
log = logger(NAME)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = new_parser("compare", __doc__, conflict_handler="resolve")
    add_common_args(ap)  # --server-args: extra flags of this service; --remeasure-rate: unused
    ap.set_defaults(timeout_s=2.0)
    arg = ap.add_argument
    arg("--p99-objective-ms", type=float, default=0.0, help="p99 objective of the sweeps (0 = by the machine)")
    arg("--systems", default=",".join(SYSTEMS), help="servers to measure, in this order (keep Ray last)")
    arg("--batch-sizes", type=ints, default=[1, 8, 16, 32])
    arg("--engine-rounds", type=int, default=2)
    arg("--engine-min-s", type=float, default=1.5)
    arg("--step-s", type=float, default=8.0, help="seconds per sweep step")
    arg("--refine", type=int, default=3, help="bisection steps after the grid")
    arg("--start-fraction", type=float, default=0.25, help="first sweep rate, as a fraction of the raw engine's")
    arg("--fixed-rate", "--rate", type=float, default=0.0, help="the load for p50/p99, CPU and memory (0: by "
        "--fixed-fraction)")
    arg("--fixed-fraction", type=float, default=0.6, help="of the lowest max rate")
    arg("--fixed-s", type=float, default=10.0, help="seconds at the fixed load")
    arg("--naive-workers", type=int, default=10, help="naive server: gRPC handler threads")
    arg("--mlserver-max-batch-size", type=int, default=16)
    arg("--mlserver-max-batch-time-ms", type=float, default=5.0)
    arg("--mlserver-python", type=Path, default=MLSERVER_PYTHON, help="the interpreter of MLServer's environment")
    arg("--litserve-max-batch-size", type=int, default=16)
    arg("--litserve-batch-timeout-ms", type=float, default=5.0)
    arg("--litserve-api-servers", type=int, default=0, help="LitServe's uvicorn processes (0: one per worker)")
    arg("--litserve-fast-queue", action="store_true", help="LitServe's ZeroMQ queues")
    arg("--ray-max-batch-size", type=int, default=16)
    arg("--ray-batch-wait-ms", type=float, default=5.0)
    arg("--ray-max-ongoing-requests", type=int, default=64)
    arg("--ray-num-cpus", type=int, default=2)
    arg("--ray-variants", default=None, metavar="SIZE:WAIT_MS,...",
        type=lambda t: [(int(s), float(w or 0)) for s, _, w in (p.partition(":") for p in t.split(",") if p.strip())],
        help="extra Ray Serve batching settings, swept only ('' = none) [default: 8:2; none with --quick]")
    arg("--no-floor", action="store_true", help="skip the transport floor")
    arg("--from-results", type=Path, default=None, metavar="RESULTS_JSON",
        help="measure nothing: rewrite the section, plot and BENCHMARKS.md from a saved results.json")
    args = ap.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(args.systems) - set(SYSTEMS):
        ap.error(f"unknown --systems: {sorted(unknown)}")
    if args.quick:
        args.batch_sizes, args.engine_rounds, args.engine_min_s = [1, 8, 16], 1, 0.8
        args.step_s, args.refine, args.fixed_s = 4.0, 1, 4.0
    args.ray_variants = ([] if args.quick else [(8, 2.0)]) if args.ray_variants is None else args.ray_variants
    return args


@dataclass
class System:
    """One server under test, started as a subprocess."""

    name: str
    handle: ServerProcess  # or a PeerProcess
    config: dict[str, Any]
    requests: list[bytes]  # the load's requests as this system is sent them (`bench.peers.wire`)
    metadata: tuple[tuple[str, str], ...] = ()
    method: str = SCORE_METHOD  # a gRPC method, or the HTTP path when `http`
    http: bool = False
    out: dict[str, Any] = field(default_factory=dict)

    def channel(self) -> Any:
        """A grpc.aio channel, or for an HTTP peer the adapter the load generator drives the same way."""
        if self.http:
            from bench.kit.http_channel import HttpChannel  # aiohttp: a bench package, only needed here

            return HttpChannel(self.handle.target)
        return grpc.aio.insecure_channel(self.handle.target)

    def start(self) -> None:
        self.handle.start(timeout=240.0)
        self.out.update(start_s=round(self.handle.start_seconds, 1), command=self.handle.command,
                        memory_idle=tree_memory_mib(self.handle.pid))

    def stop(self) -> None:
        self.out["stop"] = {"returncode": self.handle.stop(),
                            "leftover_processes_ended": getattr(self.handle, "leftovers", 0)}


def flag_list(cfg: dict[str, Any]) -> list[str]:
    return [x for k, v in cfg.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def make_systems(args: argparse.Namespace, out_dir: Path, version_dir: Path, pinned: int,
                 requests: list[bytes]) -> tuple[list[System], list[System]]:
    """The servers in `--systems` order, and the other Ray Serve settings (`--ray-variants`)."""
    threads, lanes = arrangement(args.threads)
    vdir = ["--version-dir", str(version_dir)]

    def ray(name: str, size: int, wait: float) -> System:
        cfg = {"max_batch_size": size, "batch_wait_timeout_ms": wait, "max_ongoing_requests":
               args.ray_max_ongoing_requests, "num_cpus": args.ray_num_cpus, "replicas": lanes, "threads": threads}
        md = (("application", RAY_APP),)
        log_path = out_dir / f"{name.replace(':', '-')}.log"
        peer = PeerProcess("ray_peer", [*vdir, *flag_list(cfg)], requests[0], log_path, md)
        return System(name, peer, {**cfg, "ray": version("ray")}, requests, md)

    systems = []
    for name in args.systems:
        if name == "service":
            flags = server_flags(threads=args.threads, pin=(args.model, pinned), extra=args.server_args.split())
            spec = ServerSpec(args.model_repo, extra=flags, log_path=out_dir / "service.log")
            systems.append(System(name, ServerProcess(spec), {"flags": flags}, requests))
        elif name == "naive":
            flags = [*vdir, "--threads", str(threads), "--workers", str(args.naive_workers)]
            peer = PeerProcess("naive_server", flags, requests[0], out_dir / "naive.log")
            systems.append(System(name, peer, {"workers": args.naive_workers, "batching": "none"}, requests))
        elif name == "mlserver":  # one inference process per lane, as Ray gets one replica per lane
            cfg = {"max_batch_size": args.mlserver_max_batch_size, "max_batch_time_ms": args.mlserver_max_batch_time_ms,
                   "parallel_workers": lanes, "threads": threads}
            bodies = for_protocol("oip", requests)
            peer = PeerProcess("mlserver_peer", [*vdir, *flag_list(cfg)], bodies[0], out_dir / "mlserver.log",
                               method=OIP_METHOD, python=str(args.mlserver_python))
            systems.append(System(name, peer, {**cfg, "mlserver": args.mlserver_version, "route": "OIP gRPC"},
                                  bodies, method=OIP_METHOD))
        elif name == "litserve":
            cfg = {"max_batch_size": args.litserve_max_batch_size, "batch_timeout_ms": args.litserve_batch_timeout_ms,
                   "workers": lanes, "threads": threads, "num_api_servers": args.litserve_api_servers or lanes}
            bodies = for_protocol("json", requests)
            flags = [*vdir, *flag_list(cfg), *(["--fast-queue"] if args.litserve_fast_queue else [])]
            peer = PeerProcess("litserve_peer", flags, bodies[0], out_dir / "litserve.log", method=LITSERVE_PATH,
                               http=True)
            systems.append(System(name, peer, {**cfg, "fast_queue": args.litserve_fast_queue, "litserve":
                                               version("litserve"), "route": "HTTP/JSON"}, bodies,
                                  method=LITSERVE_PATH, http=True))
        else:
            systems.append(ray(name, args.ray_max_batch_size, args.ray_batch_wait_ms))
    return systems, [ray(f"ray:{s}:{w:g}", s, w) for s, w in args.ray_variants if "ray" in args.systems]


async def start_and_sweep(s: System, args: argparse.Namespace, raw_rate: float) -> bool:
    """Starts the system and finds its max rate, its tree's memory sampled after each step (the peak RSS, with
    its PSS, is kept); False, with the error in `s.out`, when it did not start."""
    log(f"{report.label(s.name)}: starting")
    try:
        await asyncio.to_thread(s.start)
    except (RuntimeError, TimeoutError, OSError) as exc:  # one peer that will not start must not sink the run
        s.out["error"] = str(exc)
        log(f"  did not start: {exc}")
        await asyncio.to_thread(s.stop)
        return False
    log(f"  up in {s.out['start_s']:.1f} s: {s.out['memory_idle']}")
    peak = s.out["memory_peak_sweep"] = dict[str, float]()
    settled: list[float] = s.out.setdefault("idle_wait_s", [])

    def progress(msg: str) -> None:
        log(msg)
        mem = tree_memory_mib(s.handle.pid)
        peak.update(mem if mem["rss_mib"] > peak.get("rss_mib", 0.0) else {})
        # Between steps (every answer is in, nothing is in flight): a server that goes on computing the calls its
        # clients gave up on (MLServer, LitServe) would start the next step behind them; wait until it is idle.
        settled.append(round(wait_idle(s.handle.pid), 1))
        if settled[-1] > 1.5:
            log(f"  (busy {settled[-1]:g} s more after that, on calls whose clients had given up)")

    async with s.channel() as channel:
        s.out["sweep"] = await find_max_rate(
            channel, s.requests, p99_objective_ms=args.p99_objective_ms, start_rate=round(
                args.start_fraction * raw_rate, 1), step_s=args.step_s, timeout_s=args.timeout_s, refine=args.refine,
            metadata=s.metadata, method=s.method, max_rate=2.0 * raw_rate, seed=args.seed, progress=progress)
    log(f"  max {report.max_rate(s.out['sweep']):.1f}/s with p99 ≤ {args.p99_objective_ms:g} ms")
    return True


async def cpu_at(channel: Any, requests: list[bytes], pid: int, cfg: LoadConfig
                 ) -> tuple[dict[str, Any], dict[str, float]]:
    """One unmeasured second (the channel is new, the server idle), then `cfg` with the CPU of `pid`'s tree."""
    await run_open_loop(channel, requests, replace(cfg, duration_s=1.0, seed=cfg.seed - 1))
    monitor = CpuMonitor(pid, tree=True)
    monitor.start()
    summary = (await run_open_loop(channel, requests, cfg)).summary()
    return summary, monitor.stop()


async def fixed_load(s: System, args: argparse.Namespace, rate: float) -> None:
    # At least ~100 calls, so p99 is not just the slowest one; capped so a slow machine does not drag on.
    duration = round(min(max(args.fixed_s, 100.0 / rate), 2 * args.fixed_s), 1)
    async with s.channel() as channel:
        summary, cpu = await cpu_at(channel, s.requests, s.handle.pid, LoadConfig(
            rate=rate, duration_s=duration, timeout_s=args.timeout_s, method=s.method, metadata=s.metadata,
            seed=args.seed + 1))
    # Held = every call OK and p99 within the objective (the sweep's keep-up test, recorded, is mostly noise here).
    p99 = summary["latency"]["p99_ms"]
    why = ("failures: " + ", ".join(f"{k} {v}" for k, v in summary["failures"].items()) if summary["failures"]
           else f"p99 {p99} ms over the {args.p99_objective_ms:g} ms objective"
           if p99 is None or p99 > args.p99_objective_ms else "ok")
    s.out["fixed"] = {**summary, "sustainable": why == "ok", "verdict": why, "cpu": cpu,
                      "memory": tree_memory_mib(s.handle.pid), "sweep_judge": judge(summary, args.p99_objective_ms)[1]}
    log(f"  {s.name} at {rate:.1f}/s for {duration:g} s: p50 {summary['latency']['p50_ms']} ms, p99 {p99} ms, "
        f"{cpu['server_cores']:.2f} cores, {s.out['fixed']['memory']} -> {why}")


def ceiling(share: float, at: float) -> float:
    """The rate, as a share of the raw limit, at which the engine under the transport's load computes as much
    as arrives, if the engine's loss grows in proportion to the rate: the engine kept `share` of its speed
    while the transport carried `at` x the limit, so x = 1 - (1 - share) * x / at."""
    return 1.0 / (1.0 + (1.0 - share) / at)


async def transport_ceiling(args: argparse.Namespace, engine: Engine, work: Workload, requests: list[bytes],
                            version_dir: Path, out_dir: Path, raw_rate: float) -> dict[str, Any]:
    """How much of the machine a Python gRPC front end leaves the engine at TARGET_RAW x the raw limit: no server
    paying this transport (a canned-answer server) computes more than the engine beside it does."""
    rate, seconds = round(report.TARGET_RAW * raw_rate, 1), 2 * args.engine_min_s
    peer = PeerProcess("canned_server", ["--version-dir", str(version_dir)], requests[0], out_dir / "canned.log")
    log(f"transport floor: a canned-answer gRPC server at {rate:.1f}/s")
    out: dict[str, Any] = {"rate": rate, "probe_s": seconds}
    free, loaded, carried = [], [], []  # raw engine alone and under load; what the transport carried meanwhile
    try:
        await asyncio.to_thread(peer.start)
        async with grpc.aio.insecure_channel(peer.target) as channel:
            alone, cpu = await cpu_at(channel, requests, peer.pid, LoadConfig(
                rate=rate, duration_s=2 * seconds, timeout_s=args.timeout_s, seed=98))
            out.update(server_cores=cpu["server_cores"], generator_cores=alone["generator_cpu_cores"],
                       transport_alone={k: alone[k] for k in ("offered_rate", "achieved_rate", "failures", "latency")})
            free.append(await asyncio.to_thread(probe, engine, work, seconds))
            for i in (1, 3):  # the load starts first and outlasts the probe, so the probe never sees it ramp
                task = asyncio.create_task(run_open_loop(channel, requests, LoadConfig(
                    rate=rate, duration_s=seconds + 1.0, timeout_s=args.timeout_s, seed=98 + i)))
                await asyncio.sleep(0.5)
                loaded.append(await asyncio.to_thread(probe, engine, work, seconds))
                carried.append((await task).summary()["achieved_rate"])
                free.append(await asyncio.to_thread(probe, engine, work, seconds))
        share = (sum(loaded) / len(loaded)) / (sum(free) / len(free))
        out.update(engine_alone=[round(x, 1) for x in free], engine_loaded=[round(x, 1) for x in loaded],
                   carried=[round(x, 1) for x in carried], engine_share=round(share, 3),
                   ceiling_ratio=round(ceiling(share, report.TARGET_RAW), 3))
        log(f"  raw engine alone {out['engine_alone']}/s, beside it {out['engine_loaded']}/s: keeps {share:.2f}")
    except (RuntimeError, TimeoutError, OSError) as exc:  # a floor that fails must not sink the run
        log(f"  the transport floor failed: {exc}")
        out["error"] = str(exc)
    finally:
        out["stop"] = {"returncode": await asyncio.to_thread(peer.stop), "leftover_processes_ended": peer.leftovers}
    return out


async def servers_phase(args: argparse.Namespace, results: dict[str, Any], systems: list[System],
                        variants: list[System], raw_rate: float) -> None:
    up: list[System] = []  # started and not yet stopped
    try:
        for s in systems:
            up.append(s)
            if not await start_and_sweep(s, args, raw_rate):
                up.remove(s)
        if not up:
            return
        maxima = [m for s in up if (m := report.max_rate(s.out["sweep"])) > 0]
        # Nobody met the objective: half the lowest rate anyone completed.
        rate = results["fixed_rate"] = args.fixed_rate or (
            round(args.fixed_fraction * min(maxima), 1) if maxima
            else max(1.0, 0.5 * min(s.out["sweep"]["saturation_rate"] for s in up)))
        log(f"fixed load for every system: {rate:.1f}/s")
        while up:  # newest first: Ray (started last) is measured and stopped before the others' fixed runs
            await fixed_load(up[-1], args, rate)
            await asyncio.to_thread(up.pop().stop)
        # The other Ray Serve settings, swept alone (one Ray cluster at a time): × Ray Serve divides by the best.
        for s in variants:
            up.append(s)
            if await start_and_sweep(s, args, raw_rate):
                await asyncio.to_thread(s.stop)
            up.remove(s)
    finally:
        for s in up:
            await asyncio.to_thread(s.stop)


def objective_for(run_ms: float) -> float:
    """100 ms (a scoring call sits inside a search request's budget), or, where one run of the best batch takes
    over 40 ms, 2.5 such runs rounded up to 50 ms: a call may find its lane busy with one and then run in the
    next; tighter would rule batching out on that machine, looser reward queueing."""
    return max(report.DEFAULT_OBJECTIVE_MS, 50.0 * math.ceil(2.5 * run_ms / 50.0))


def leave_out_missing(args: argparse.Namespace) -> None:
    """Drops from --systems each peer whose framework is not installed, saying so."""
    bench = "`make bench` installs requirements-bench.txt"
    args.mlserver_version = package_version(args.mlserver_python, "mlserver") if "mlserver" in args.systems else None
    if "mlserver" in args.systems and args.mlserver_version is None:
        log(f"MLServer: not installed at {args.mlserver_python} (`make bench` builds that environment from "
            "requirements-mlserver.txt); leaving it out")
        args.systems.remove("mlserver")
    if "litserve" in args.systems and (find_spec("litserve") is None or find_spec("aiohttp") is None):
        log(f"LitServe: litserve or aiohttp is not installed ({bench}); leaving it out")
        args.systems.remove("litserve")
    if "ray" in args.systems and find_spec("ray") is None:
        log(f"Ray Serve: ray is not installed ({bench}); leaving it out")
        args.systems.remove("ray")


def measure(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    version_dir = newest_version(args.model_repo, args.model).resolve()
    manifest = read_manifest(version_dir)
    if "fp32" not in manifest.precisions:
        raise SystemExit(f"{version_dir} has no fp32 graph; run `make demo` first")
    encoder, pairs, items, messages = FeatureEncoder(version_dir, manifest), load_pairs(args.data), [], []
    for p in pairs.pairs:
        with contextlib.suppress(FeatureError):  # the servers would refuse it too: not part of the load
            items.append(encoder.encode(p.query, p.title or None))
            messages.append(scoring_pb2.ScoreRequest(query=p.query, title=p.title or None))
    requests = serialize_requests(messages)
    results: dict[str, Any] = {"machine": machine(), "model": {
        "name": manifest.model, "version": manifest.version, "heads": len(manifest.heads), "precision": "fp32",
        "path": str(version_dir)}, "data": {"kind": "real" if pairs.real else "synthetic", "pairs": len(items),
                                            "source": pairs.source}}
    log(f"data: {pairs.source}, {len(items)} pairs; model {manifest.model} v{manifest.version} fp32")

    engine = load_engine(version_dir, manifest, "fp32", *arrangement(args.threads))
    sweep = throughput_sweep({"fp32": engine}, items, args.batch_sizes, arrival_order_precisions=(),
                             rounds=args.engine_rounds, min_seconds=args.engine_min_s, progress=log)
    best = sweep["best"]["fp32"]
    results["raw"] = {"samples_per_s": best["samples_per_s"], "batch_size": best["batch_size"],
                      "rounds": args.engine_rounds, "by_batch_size": sweep["grouped"]["fp32"]}
    log(f"  raw engine best: {best['samples_per_s']:.1f} samples/s at batch {best['batch_size']}")
    if results.setdefault("objective_derived", args.p99_objective_ms <= 0):
        args.p99_objective_ms = objective_for(report.batch_run_ms(results["raw"], arrangement(args.threads)[1]))
        log(f"  p99 objective: {args.p99_objective_ms:g} ms (by the machine; --p99-objective-ms to choose)")
    leave_out_missing(args)

    work = make_workload("after", random.Random(5).sample(items, min(512, len(items))), best["batch_size"], True, 5)
    engine.run(work.batches[0])
    if not args.no_floor:
        results["transport"] = asyncio.run(transport_ceiling(args, engine, work, requests, version_dir, out_dir,
                                                             best["samples_per_s"]))
    systems, variants = make_systems(args, out_dir, version_dir, manifest.version, requests)
    asyncio.run(servers_phase(args, results, systems, variants, best["samples_per_s"]))
    # The raw engine again, after the servers: shared machines drift, and the ratios assume they did not.
    results["raw"]["after_samples_per_s"] = round(probe(engine, work, 2 * args.engine_min_s), 1)
    log(f"raw engine after the servers: {results['raw']['after_samples_per_s']:.1f} samples/s")
    results["systems"] = {s.name: {"config": s.config, **s.out} for s in systems if "sweep" in s.out}
    results["ray_variants"] = {s.name: {"config": s.config, **s.out} for s in variants if "sweep" in s.out}
    results["not_measured"] = {s.name: s.out.get("error", "") for s in [*systems, *variants] if "sweep" not in s.out}
    results.update(table=report.table_rows(results), targets=report.targets(results),
                   elapsed_s=round(time.perf_counter() - t0, 1),
                   args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = args.out / NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.from_results.read_text()) if args.from_results else measure(args, out_dir)
    png = report.plot(results, out_dir / "compare.png")
    publish(args, NAME, results, report.markdown(results, png.name), [png], log, out=out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

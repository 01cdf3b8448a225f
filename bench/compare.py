"""python -m bench.compare --model-repo model_repo --out bench_out [--quick] [--p99-objective-ms MS]

This service against its peers on the same model (the demo version's fp32 graph), tokenizer, ORT options
(by default 1 intra-op thread per run and one run per core at a time; Ray Serve as one replica per core)
and machine, with the same query/title pairs, in one run:

- the raw engine alone: ONNX Runtime on length-grouped batches at its best batch size (the ceiling);
- the transport floor (`transport_ceiling`): the raw engine probed while a canned-answer gRPC server
  (`bench.peers.canned_server`, no model) carries 90% of that rate from the same generator, which tells
  how close to the raw engine any Python gRPC front end can get on this machine;
- a naive gRPC server (`bench.peers.naive_server`): one `InferenceSession.run` per request;
- Ray Serve (`bench.peers.ray_peer`): its gRPC proxy and a `@serve.batch` deployment;
- this service (`python -m server`, fp32, its default CPU arrangement, result cache off).

Every server gets the same open-loop Poisson load from `loadtest.openloop` with the same serialized
requests; `loadtest.sweep.find_max_rate` finds the highest rate each sustains with p99 ≤ the objective.
Then all run at one fixed rate that all sustained, for p50/p99 and their CPU and memory. Writes
<out>/compare/results.json, summary.md and compare.png, and its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.kit.data import DEFAULT_DATA, REPO_ROOT, load_pairs
from bench.kit.engine import (
    Engine,
    Workload,
    arrangement,
    describe,
    load_engine,
    make_workload,
    probe,
    throughput_sweep,
)
from bench.kit.machine import TreeCpuMonitor, machine_info, tree_memory_mib
from bench.kit.publish import merge_section
from bench.kit.server import ServerProcess, ServerSpec, free_port, server_flags
from bench.peers.procs import PeerProcess
from loadtest.openloop import LoadConfig, run_open_loop, serialize_requests
from loadtest.sweep import find_max_rate, judge
from model_format.features import EncodedRequest, FeatureEncoder, FeatureError
from model_format.repository import latest_complete, scan_model
from scoring.v1 import scoring_pb2

PNG = "compare.png"
SECTION = "compare"
RAY_APP = "scoring"  # bench.peers.ray_peer.APP_NAME (not imported: that module imports ray)
DEFAULT_OBJECTIVE_MS = 100.0
TARGET_RAW = 0.90  # this service's max throughput ≥ 90% of the raw engine's
TARGET_RAY = 2.0  # … and ≥ 2× Ray Serve's
LABELS = {"raw": "raw engine (ORT alone)", "naive": "naive gRPC server", "ray": "Ray Serve",
          "service": "this service"}
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[compare {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repo", type=Path, default=Path("model_repo"))
    ap.add_argument("--model", default="demo")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="results go to <out>/compare/")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL query/title pairs (synthetic when absent)")
    ap.add_argument("--threads", type=int, default=0,
                    help="ORT threads per run in every system (0 = the service's CPU default: one thread per "
                         "run, one run at a time per core)")
    ap.add_argument("--p99-objective-ms", type=float, default=0.0,
                    help="p99 objective of the sweeps (0 = by the machine: see objective_for)")
    ap.add_argument("--systems", default="naive,service,ray",
                    help="servers to measure, in this order (Ray last: its idle daemons never overlap a sweep)")
    ap.add_argument("--batch-sizes", type=ints, default=[1, 8, 16, 32], help="raw engine batch sizes")
    ap.add_argument("--engine-rounds", type=int, default=2)
    ap.add_argument("--engine-min-s", type=float, default=1.5)
    ap.add_argument("--step-s", type=float, default=8.0, help="seconds per sweep step")
    ap.add_argument("--refine", type=int, default=3, help="bisection steps after the grid")
    ap.add_argument("--start-fraction", type=float, default=0.25,
                    help="first sweep rate, as a fraction of the raw engine's best throughput")
    ap.add_argument("--timeout-s", type=float, default=2.0, help="gRPC deadline of every call")
    ap.add_argument("--fixed-rate", type=float, default=0.0,
                    help="the common load for p50/p99, CPU and memory (0 = --fixed-fraction of the lowest max)")
    ap.add_argument("--fixed-fraction", type=float, default=0.6)
    ap.add_argument("--fixed-s", type=float, default=10.0, help="seconds at the fixed load")
    ap.add_argument("--naive-workers", type=int, default=10, help="naive server: gRPC handler threads")
    ap.add_argument("--ray-max-batch-size", type=int, default=16)
    ap.add_argument("--ray-batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--ray-max-ongoing-requests", type=int, default=64)
    ap.add_argument("--ray-num-cpus", type=int, default=2)
    ap.add_argument("--ray-variants", type=ray_variants, default=None, metavar="SIZE:WAIT_MS,...",
                    help="extra Ray Serve batching settings, swept only ('' = none) [default: 8:2; none with --quick]")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip the transport floor (the raw engine under a canned-answer gRPC server's load)")
    ap.add_argument("--quick", action="store_true", help="smoke run (about 2-3 minutes); numbers are rough")
    ap.add_argument("--benchmarks-md", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    ap.add_argument("--docs-dir", type=Path, default=REPO_ROOT / "docs" / "bench")
    ap.add_argument("--no-docs", action="store_true", help="leave BENCHMARKS.md and docs/bench/ alone")
    ap.add_argument("--from-results", type=Path, default=None, metavar="RESULTS_JSON",
                    help="measure nothing: rewrite summary, plot and BENCHMARKS.md from a saved results.json")
    args = ap.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - {"naive", "service", "ray"}
    if unknown:
        ap.error(f"unknown --systems: {sorted(unknown)}")
    if args.quick:
        args.batch_sizes, args.engine_rounds, args.engine_min_s = [1, 8, 16], 1, 0.8
        args.step_s, args.refine, args.fixed_s = 4.0, 1, 4.0
    if args.ray_variants is None:
        args.ray_variants = [] if args.quick else [(8, 2.0)]
    return args


@dataclass
class System:
    """One server under test, started as a subprocess; `handle` is a ServerProcess or a PeerProcess."""

    name: str
    handle: ServerProcess | PeerProcess
    config: dict[str, Any]
    metadata: tuple[tuple[str, str], ...] = ()
    out: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.handle.pid

    @property
    def target(self) -> str:
        return self.handle.target

    def start(self) -> None:
        self.handle.start()
        self.out["start_s"] = round(self.handle.start_seconds, 1)
        self.out["command"] = self.handle.command
        self.out["memory_idle"] = tree_memory_mib(self.pid)

    def stop(self) -> None:
        if isinstance(self.handle, PeerProcess):
            self.out["stop"] = self.handle.stop()
        else:
            self.out["stop"] = {"returncode": self.handle.stop()}


def make_systems(args: argparse.Namespace, out_dir: Path, version_dir: Path, version: int,
                 probe: bytes) -> list[System]:
    systems = []
    for name in args.systems:
        log_path = out_dir / f"{name}.log"
        if name == "service":
            flags = server_flags(threads=args.threads, pin=(args.model, version))
            handle: ServerProcess | PeerProcess = ServerProcess(ServerSpec(args.model_repo, REPO_ROOT, flags,
                                                                           log_path))
            systems.append(System(name, handle, {"flags": flags}))
        elif name == "naive":
            port = free_port()
            cmd = ["-m", "bench.peers.naive_server", "--version-dir", str(version_dir), "--port", str(port),
                   "--threads", str(arrangement(args.threads)[0]), "--workers", str(args.naive_workers)]
            systems.append(System(name, PeerProcess(name, cmd, port, probe, cwd=REPO_ROOT, log_path=log_path),
                                  {"workers": args.naive_workers, "batching": "none"}))
        else:
            systems.append(make_ray(args, out_dir, version_dir, probe, name, args.ray_max_batch_size,
                                    args.ray_batch_wait_ms))
    return systems


def make_ray(args: argparse.Namespace, out_dir: Path, version_dir: Path, probe: bytes, name: str,
             max_batch_size: int, batch_wait_ms: float) -> System:
    port = free_port()
    cfg = {"max_batch_size": max_batch_size, "batch_wait_timeout_ms": batch_wait_ms,
           "max_ongoing_requests": args.ray_max_ongoing_requests, "num_cpus": args.ray_num_cpus,
           "replicas": arrangement(args.threads)[1], "threads": arrangement(args.threads)[0],
           "ray": _ray_version()}
    cmd = ["-m", "bench.peers.ray_peer", "--version-dir", str(version_dir), "--grpc-port", str(port),
           "--http-port", str(free_port()), "--threads", str(cfg["threads"]), "--replicas", str(cfg["replicas"]),
           "--num-cpus", str(args.ray_num_cpus),
           "--max-batch-size", str(max_batch_size), "--batch-wait-ms", str(batch_wait_ms),
           "--max-ongoing-requests", str(args.ray_max_ongoing_requests)]
    md = (("application", RAY_APP),)
    handle = PeerProcess(name, cmd, port, probe, cwd=REPO_ROOT, log_path=out_dir / f"{name.replace(':', '-')}.log",
                         metadata=md)
    return System(name, handle, cfg, md)


def _replicas(config: dict[str, Any]) -> str:
    n = int(config.get("replicas", 1))
    return "one replica" if n == 1 else f"{n} replicas, each"


def ray_variants(text: str) -> list[tuple[int, float]]:
    """'8:2,32:10' -> [(8, 2.0), (32, 10.0)]: max_batch_size and batch wait (ms) of extra Ray Serve sweeps."""
    out = []
    for part in text.split(","):
        if part.strip():
            size, _, wait = part.partition(":")
            out.append((int(size), float(wait or 0)))
    return out


def label(name: str, config: dict[str, Any] | None = None) -> str:
    """Display name; Ray Serve's carries its batching settings when `config` (or the name) gives them."""
    if name.startswith("ray:"):
        _, size, wait = name.split(":")
        return f"Ray Serve (batch ≤ {size}, wait {wait} ms)"
    if name == "ray" and config:
        return f"Ray Serve (batch ≤ {config['max_batch_size']}, wait {config['batch_wait_timeout_ms']:g} ms)"
    return LABELS[name]


def _ray_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ray")
    except PackageNotFoundError:
        return "not installed"


async def _peak_memory(root: int, stop: asyncio.Event, peak: dict[str, float]) -> None:
    """Samples the tree's memory every second until `stop`; keeps the highest RSS seen (and its PSS)."""
    while not stop.is_set():
        mem = await asyncio.to_thread(tree_memory_mib, root)
        if mem["rss_mib"] > peak.get("rss_mib", 0.0):
            peak.update(mem)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def sweep_system(sys_: System, requests: list[bytes], args: argparse.Namespace, raw_rate: float) -> None:
    stop = asyncio.Event()
    peak: dict[str, float] = {}
    sampler = asyncio.create_task(_peak_memory(sys_.pid, stop, peak))
    try:
        async with grpc.aio.insecure_channel(sys_.target) as channel:
            found = await find_max_rate(
                channel, requests, p99_objective_ms=args.p99_objective_ms,
                start_rate=round(args.start_fraction * raw_rate, 1), step_s=args.step_s,
                timeout_s=args.timeout_s, refine=args.refine, metadata=sys_.metadata, max_rate=2.0 * raw_rate,
                progress=log)
    finally:
        stop.set()
        await sampler
    sys_.out["sweep"] = found
    sys_.out["memory_peak_sweep"] = peak


async def fixed_load(sys_: System, requests: list[bytes], args: argparse.Namespace, rate: float) -> None:
    # At least ~100 calls, so p99 is not just the slowest one; capped so a slow machine does not drag on.
    duration = round(min(max(args.fixed_s, 100.0 / rate), 2 * args.fixed_s), 1)
    async with grpc.aio.insecure_channel(sys_.target) as channel:
        # One unmeasured second: the channel is new and the server was idle.
        await run_open_loop(channel, requests, LoadConfig(rate=rate, duration_s=1.0, timeout_s=args.timeout_s,
                                                          metadata=sys_.metadata, seed=99))
        monitor = TreeCpuMonitor(sys_.pid)
        monitor.start()
        result = await run_open_loop(channel, requests, LoadConfig(rate=rate, duration_s=duration,
                                                                   timeout_s=args.timeout_s,
                                                                   metadata=sys_.metadata, seed=100))
        cpu = monitor.stop()
    summary = result.summary()
    # Held = every call OK and p99 within the objective (a server whose p99 stayed low kept up). The sweep's
    # keep-up test is recorded too, but over a short window it mostly measures Poisson counting noise.
    _, keep_up = judge(summary, args.p99_objective_ms)
    p99 = summary["latency"]["p99_ms"]
    if summary["failures"]:
        ok, why = False, "failures: " + ", ".join(f"{k} {v}" for k, v in summary["failures"].items())
    elif p99 is None or p99 > args.p99_objective_ms:
        ok, why = False, f"p99 {p99} ms over the {args.p99_objective_ms:g} ms objective"
    else:
        ok, why = True, "ok"
    mem = tree_memory_mib(sys_.pid)
    lat = summary["latency"]
    sys_.out["fixed"] = {**summary, "sustainable": ok, "verdict": why, "sweep_judge": keep_up, "cpu": cpu,
                         "memory": mem}
    log(f"  {sys_.name} at {rate:.1f}/s for {duration:g} s: achieved {summary['achieved_rate']:.1f}/s, "
        f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, server {cpu['server_cores']:.2f} cores, "
        f"RSS {mem['rss_mib']:.0f} MiB ({mem['processes']} processes), foreign {cpu['foreign_cores']:.2f} "
        f"cores -> {why}")


async def transport_ceiling(args: argparse.Namespace, engine: Engine, work: Workload, requests: list[bytes],
                            version_dir: Path, out_dir: Path, raw_rate: float) -> dict[str, Any]:
    """How much of the machine a Python gRPC front end leaves the engine at the target rate.

    A canned-answer server (`bench.peers.canned_server`: no model) carries TARGET_RAW x the raw limit from
    the same generator. First its CPU and the generator's are measured alone; then the raw engine runs
    alone, under that load, alone, under that load, alone (probes of 2 x --engine-min-s). A server that
    must pay this transport cannot compute more than the engine under load does: if that is below the
    rate, the target is out of reach on this machine whatever the batching."""
    rate = round(TARGET_RAW * raw_rate, 1)
    seconds = 2 * args.engine_min_s
    port = free_port()
    peer = PeerProcess("canned", ["-m", "bench.peers.canned_server", "--version-dir", str(version_dir),
                                  "--port", str(port)], port, requests[0], cwd=REPO_ROOT,
                       log_path=out_dir / "canned.log")
    log(f"transport floor: a canned-answer gRPC server at {rate:.1f}/s ({TARGET_RAW:.0%} of the raw limit)")
    out: dict[str, Any] = {"rate": rate, "probe_s": seconds}
    try:
        await asyncio.to_thread(peer.start)
    except (RuntimeError, TimeoutError, OSError) as exc:  # a floor that will not start must not sink the run
        log(f"  the canned-answer server did not start: {exc}")
        await asyncio.to_thread(peer.stop)
        return {**out, "error": str(exc)}
    try:
        async with grpc.aio.insecure_channel(peer.target) as channel:
            def load(duration: float, seed: int) -> LoadConfig:
                return LoadConfig(rate=rate, duration_s=duration, timeout_s=args.timeout_s, seed=seed)

            await run_open_loop(channel, requests, load(1.0, 97))  # the channel is new
            monitor = TreeCpuMonitor(peer.pid)
            monitor.start()
            alone = (await run_open_loop(channel, requests, load(2 * seconds, 98))).summary()
            cpu = monitor.stop()
            out["server_cores"] = cpu["server_cores"]
            out["generator_cores"] = alone["generator_cpu_cores"]
            out["transport_alone"] = {k: alone[k] for k in ("offered_rate", "achieved_rate", "failures", "latency")}
            free, loaded, carried = [], [], []
            for i in range(5):
                if i % 2 == 0:
                    free.append(await asyncio.to_thread(probe, engine, work, seconds))
                    continue
                # The load starts first and outlasts the probe, so the probe never sees it ramp.
                task = asyncio.create_task(run_open_loop(channel, requests, load(seconds + 1.0, 98 + i)))
                await asyncio.sleep(0.5)
                loaded.append(await asyncio.to_thread(probe, engine, work, seconds))
                carried.append((await task).summary()["achieved_rate"])
    finally:
        out["stop"] = await asyncio.to_thread(peer.stop)
    out["engine_alone"] = [round(x, 1) for x in free]
    out["engine_loaded"] = [round(x, 1) for x in loaded]
    out["carried"] = [round(x, 1) for x in carried]
    share = (sum(loaded) / len(loaded)) / (sum(free) / len(free))
    out["engine_share"] = round(share, 3)
    out["ceiling_ratio"] = round(ceiling(share, TARGET_RAW), 3)
    log(f"  transport at {rate:.1f}/s: server {out['server_cores']:.3f} cores, generator "
        f"{out['generator_cores']:.3f} cores; raw engine alone {out['engine_alone']}/s, under that load "
        f"{out['engine_loaded']}/s: the engine keeps {share:.2f} of its speed")
    return out


def ceiling(share: float, at: float) -> float:
    """The rate, as a share of the raw limit, at which the engine under the transport's load computes as much
    as arrives, if the engine's loss grows in proportion to the rate: the engine kept `share` of its speed
    while the transport carried `at` x the limit, so x = 1 - (1 - share) * x / at."""
    return 1.0 / (1.0 + (1.0 - share) / at)


def max_rate(sweep: dict[str, Any]) -> float:
    """Requests/s completed in the best sustainable step: every call was answered OK, so that is the rate that
    was actually offered (Poisson count / step length); the achieved-rate window only adds counting noise."""
    return float(sweep["max_offered_rate"])


def choose_fixed_rate(args: argparse.Namespace, systems: list[System]) -> float:
    if args.fixed_rate > 0:
        return float(args.fixed_rate)
    maxima = [max_rate(s.out["sweep"]) for s in systems]
    if not any(maxima):  # nobody met the objective: half the lowest rate anyone completed
        return max(1.0, 0.5 * min(float(s.out["sweep"]["saturation_rate"]) for s in systems))
    return round(float(args.fixed_fraction) * min(m for m in maxima if m > 0), 1)


async def start_and_sweep(s: System, started: list[System], requests: list[bytes], args: argparse.Namespace,
                          raw_rate: float) -> None:
    log(f"{label(s.name)}: starting")
    started.append(s)
    try:
        await asyncio.to_thread(s.start)
    except (RuntimeError, TimeoutError, OSError) as exc:  # one peer that will not start must not sink the run
        s.out["error"] = str(exc)
        log(f"  {label(s.name)} did not start: {exc}")
        await asyncio.to_thread(s.stop)
        started.remove(s)
        return
    log(f"  up in {s.out['start_s']:.1f} s (pid {s.pid}, {s.out['memory_idle']['processes']} processes, "
        f"RSS {s.out['memory_idle']['rss_mib']:.0f} MiB); sweep with p99 ≤ {args.p99_objective_ms:g} ms")
    await sweep_system(s, requests, args, raw_rate)
    sw = s.out["sweep"]
    log(f"  {label(s.name)}: max {max_rate(sw):.1f}/s with p99 ≤ {args.p99_objective_ms:g} ms; most "
        f"completed at any step {sw['saturation_rate']:.1f}/s")


async def servers_phase(args: argparse.Namespace, results: dict[str, Any], systems: list[System],
                        variants: list[System], requests: list[bytes], raw_rate: float) -> None:
    started: list[System] = []
    try:
        for s in systems:
            await start_and_sweep(s, started, requests, args, raw_rate)
        systems = [s for s in systems if "sweep" in s.out]
        if not systems:
            return
        rate = choose_fixed_rate(args, systems)
        results["fixed_rate"] = rate
        log(f"fixed load for every system: {rate:.1f}/s")
        # Newest first: Ray (started last) is measured and stopped before the others' fixed runs.
        for s in reversed(systems):
            await fixed_load(s, requests, args, rate)
            await asyncio.to_thread(s.stop)
            started.remove(s)
            log(f"  {s.name} stopped: {s.out['stop']}")
        # Other Ray Serve batching settings, swept alone (one Ray cluster at a time), so the comparison is
        # against the best Ray configuration measured, not just the default one.
        for s in variants:
            await start_and_sweep(s, started, requests, args, raw_rate)
            if s in started:
                await asyncio.to_thread(s.stop)
                started.remove(s)
                log(f"  {s.name} stopped: {s.out['stop']}")
    finally:
        for s in started:
            await asyncio.to_thread(s.stop)


def best_ray(results: dict[str, Any]) -> tuple[str | None, float]:
    """The Ray Serve configuration with the highest max throughput (default and variants alike)."""
    rays = {n: max_rate(s["sweep"]) for n, s in {**results["systems"], **results.get("ray_variants", {})}.items()
            if n == "ray" or n.startswith("ray:")}
    if not rays:
        return None, 0.0
    name = max(rays, key=lambda n: rays[n])
    return name, rays[name]


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    raw = results["raw"]["samples_per_s"]
    servers = results["systems"]
    ray_max = best_ray(results)[1] or None
    rows = [{"system": "raw", "max_rate": raw, "vs_raw": 1.0, "vs_ray": raw / ray_max if ray_max else None,
             "note": f"batch {results['raw']['batch_size']}, length-grouped"}]
    for name, s in servers.items():
        m = max_rate(s["sweep"])
        fx = s.get("fixed", {})
        rows.append({"system": name, "max_rate": m, "vs_raw": m / raw if raw else None,
                     "vs_ray": m / ray_max if ray_max else None, "bracketed": s["sweep"]["bracketed"],
                     "p50": fx.get("latency", {}).get("p50_ms"), "p99": fx.get("latency", {}).get("p99_ms"),
                     "fixed_ok": fx.get("sustainable"), "cpu": fx.get("cpu", {}).get("server_cores"),
                     "rss": fx.get("memory", {}).get("rss_mib"), "pss": fx.get("memory", {}).get("pss_mib"),
                     "procs": fx.get("memory", {}).get("processes"),
                     "saturation": s["sweep"]["saturation_rate"]})
    return rows


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = {r["system"]: r for r in table_rows(results)}
    svc = rows.get("service")
    out = []
    if svc is not None:
        out.append({"target": f"this service ≥ {TARGET_RAW:.0%} of the raw engine", "value": svc["vs_raw"],
                    "met": svc["vs_raw"] is not None and svc["vs_raw"] >= TARGET_RAW})
        if "ray" in rows:
            v = svc["vs_ray"]
            out.append({"target": f"this service ≥ {TARGET_RAY:g}× Ray Serve", "value": v,
                        "met": v is not None and v >= TARGET_RAY})
    return out


def _f(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _x(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def markdown(results: dict[str, Any], plot: str | None) -> str:
    m, a, raw = results["machine"], results["args"], results["raw"]
    obj = a["p99_objective_ms"]
    rate = results.get("fixed_rate")
    batch_ms = batch_run_ms(raw, arrangement(a["threads"])[1])
    why = (f"chosen by the machine: 2.5 runs of the raw engine's best batch on one lane (batch {raw['batch_size']}, "
           f"about {batch_ms:.0f} ms in this run), and at least {DEFAULT_OBJECTIVE_MS:g} ms"
           if results.get("objective_derived") else f"given with `--p99-objective-ms` (one run of the raw "
           f"engine's best batch on one lane: batch {raw['batch_size']}, about {batch_ms:.0f} ms in this run)")
    out = [
        "## Peers: this service vs a naive gRPC server and Ray Serve (`python -m bench.compare`)",
        "",
        f"One run of `python -m bench.compare` ({'`--quick`, rough numbers; ' if a['quick'] else ''}"
        f"{results['elapsed_s'] / 60:.1f} min, {m['date']}, code {m['git']}, {m['cpu_model']}, "
        f"{m['usable_cpus']} CPUs, load average at start {' '.join(m['loadavg_at_start'])}). Every system runs the "
        f"demo model's fp32 graph ({results['model']['heads']} heads) with the same tokenizer and vocabularies "
        "(`model_format.features.FeatureEncoder`) and the same ONNX Runtime options (full graph optimization, "
        f"{describe(a['threads'])}: one session running that many batches at once; Ray Serve as "
        f"that many replicas), on {results['data']['pairs']} {results['data']['kind']} query/title "
        "pairs, and every server gets the same open-loop Poisson load (`loadtest.openloop`, the same serialized "
        "requests, one gRPC channel, latency from the scheduled send time) from a generator on the same "
        "2 cores.",
        "",
        f"**Objective: p99 ≤ {obj:g} ms**, {why}. A scoring call is one step inside a search request, so "
        f"its budget is tens of milliseconds with {DEFAULT_OBJECTIVE_MS:g} ms as the ceiling where the engine "
        "allows; where one batch alone takes longer, the objective leaves room for a call to find its lane busy "
        "and then run: a looser one would reward queueing, a tighter one would rule batching out.",
        "",
        f"| system | max throughput, p99 ≤ {obj:g} ms | × raw engine | × Ray Serve | p50 at {_f(rate)}/s | "
        f"p99 at {_f(rate)}/s | CPU at {_f(rate)}/s (cores) | RSS (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table_rows(results):
        if r["system"] == "raw":
            again = raw.get("after_samples_per_s")
            after = f"; {_f(again)}/s re-measured after the servers" if again is not None else ""
            out.append(f"| raw engine, ORT alone (batch {raw['batch_size']}, median of {results['raw']['rounds']} "
                       f"run(s){after}) | {_f(r['max_rate'])}/s | 1.00× | {_x(r['vs_ray'])} | – | – | – | – |")
            continue
        mark = "" if r["bracketed"] else " (≥: no failing rate above it was measured)"
        fixed_note = "" if r["fixed_ok"] in (None, True) else " ✗"
        rss = "–" if r["rss"] is None else f"{r['rss']:,.0f}" + (f" ({r['procs']} processes, PSS {r['pss']:,.0f})"
                                                                if (r["procs"] or 1) > 1 else "")
        name = label(r["system"], results["systems"][r["system"]]["config"])
        out.append(f"| {name} | {_f(r['max_rate'])}/s{mark} | {_x(r['vs_raw'])} | {_x(r['vs_ray'])} "
                   f"| {_f(r['p50'])} ms{fixed_note} | {_f(r['p99'])} ms{fixed_note} | {_f(r['cpu'], 2)} | {rss} |")
    tr = results.get("transport")
    if tr and "error" in tr:
        out += ["", f"**The transport floor was not measured**: {tr['error']}"]
    elif tr:
        free, loaded = tr["engine_alone"], tr["engine_loaded"]
        out += ["", f"**The transport floor.** A canned-answer gRPC server (`bench/peers/canned_server.py`: "
                "the same `grpc.aio` server on uvloop, decoding, response size and generator, no model) carried "
                f"{_f(tr['rate'])}/s ({TARGET_RAW:.0%} of the raw engine) on this machine using "
                f"{tr['server_cores']:.3f} cores, and the load generator {tr['generator_cores']:.3f} cores "
                f"({1000 * (tr['server_cores'] + tr['generator_cores']) / tr['rate']:.2f} ms of CPU per call). "
                f"The raw engine alone ran {', '.join(_f(x) for x in free)}/s; sharing the machine with that "
                f"transport, {', '.join(_f(x) for x in loaded)}/s (interleaved probes of {tr['probe_s']:g} s): "
                f"it kept **{tr['engine_share']:.2f}** of its speed. A server that pays this transport computes "
                f"no more than that, so on this machine none can sustain more than about "
                f"**{tr['ceiling_ratio']:.2f}× the raw engine** (where the engine's loss, growing with the rate, "
                f"meets the rate: `bench.compare.ceiling`), whatever its batching, and that only with the engine "
                "never idle: under a p99 objective the sustainable rate stays below it"
                + (f"; this service reached {svc_ratio / tr['ceiling_ratio']:.2f} of that ceiling."
                   if (svc_ratio := next((r['vs_raw'] for r in table_rows(results) if r['system'] == 'service'),
                                         None)) else ".")]
    ray_name, ray_max = best_ray(results)
    if ray_name is not None:
        cfg = results["systems"].get("ray", {}).get("config")
        out += ["", f"× Ray Serve divides by the best Ray Serve configuration measured in this run: "
                f"{label(ray_name, cfg)}, {_f(ray_max)}/s."]
    variants = results.get("ray_variants") or {}
    if variants:
        out += ["", "Other Ray Serve batching settings (max throughput sweep only):", "",
                f"| configuration | max throughput, p99 ≤ {obj:g} ms | p99 at that rate | most completed at any step |",
                "| --- | ---: | ---: | ---: |"]
        main_ray = {"ray": results["systems"]["ray"]} if "ray" in results["systems"] else {}
        for name, v in {**main_ray, **variants}.items():
            sw = v["sweep"]
            out.append(f"| {label(name, v['config'])} | {_f(max_rate(sw))}/s | {_f(sw['p99_at_max_ms'])} ms | "
                       f"{_f(sw['saturation_rate'])}/s |")
    for name, why in (results.get("not_measured") or {}).items():
        out += ["", f"**{label(name)} was not measured**: {why}"]
    out += ["", "Targets:", ""]
    for t in targets(results):
        shown = _x(t["value"]) if "Ray" in t["target"] else ("–" if t["value"] is None else f"{t['value']:.0%}")
        out.append(f"- {t['target']}: {shown}: **{'met' if t['met'] else 'NOT met'}**")
    fixed_fail = [label(n) for n, s in results["systems"].items() if not s.get("fixed", {}).get("sustainable", True)]
    if fixed_fail:
        out.append(f"- ✗ at the fixed load: {', '.join(fixed_fail)} had failed calls or a p99 over the objective "
                   "(`results.json`, `fixed`).")
    sv = results["systems"]
    out += ["", "### How each system ran", ""]
    if "naive" in sv:
        c = sv["naive"]["config"]
        out.append(f"- **Naive gRPC server** (`bench/peers/naive_server.py`): `grpc.server(ThreadPoolExecutor("
                   f"{c['workers']}))`, each call tokenizes and runs the session alone (batch 1); concurrent "
                   "calls share the session from several threads. What a team writes in an afternoon.")
    if "ray" in sv:
        c = sv["ray"]["config"]
        out.append(f"- **Ray Serve {c['ray']}** (`bench/peers/ray_peer.py`): Serve's gRPC proxy (routed by the "
                   f"`application` metadata key) → {_replicas(c)} whose `@serve.batch` method (max_batch_size "
                   f"{c['max_batch_size']}, batch_wait_timeout_s {c['batch_wait_timeout_ms'] / 1000:g}) pads the "
                   f"batch and runs the session; `max_ongoing_requests` {c['max_ongoing_requests']} (Ray's default "
                   f"of 5 would cap every batch at 5); `ray.init(num_cpus={c['num_cpus']})` and each replica reserves "
                   f"the CPUs its ORT threads use ({c.get('threads', 2)}), as this service runs one batch per core "
                   "at once, so Ray starts no extra workers on 2 cores. Memory is the sum "
                   "over all of Ray's processes (GCS, raylet, dashboard agent, controller, proxy, replica). The "
                   "batching settings tried during development are listed in `bench/peers/ray_peer.py`; this run "
                   "also sweeps the `--ray-variants` above and divides by the best.")
    if "service" in sv:
        out.append(f"- **This service**: `python -m server {' '.join(sv['service']['config']['flags'])}`.")
    out.append("- ORT beyond the thread count: the peers build their session exactly as the raw engine does "
               "(`bench.engine.load_engine`, ORT's defaults, so idle intra-op threads spin); this service uses its "
               "own defaults (`server/runtime.py`).")
    fixed_how = "the given rate" if a["fixed_rate"] else f"{a['fixed_fraction']:.0%} of the lowest max"
    out += ["", "### Method", "",
            f"1. **Raw engine**: `bench.engine.throughput_sweep` at batch sizes {a['batch_sizes']}, "
            f"length-grouped batches (the least padding possible), {a['engine_rounds']} interleaved rounds of "
            f"≥ {a['engine_min_s']:g} s; the best median is the ceiling.",
            f"2. **Max throughput**: `loadtest.sweep.find_max_rate`: steps of {a['step_s']:g} s starting at "
            f"{a['start_fraction']:.0%} of the raw engine, doubling until a step fails, then {a['refine']} "
            f"bisection steps. A step counts when every call succeeded (deadline {a['timeout_s']:g} s), the "
            f"achieved rate was ≥ 95% of the offered and p99 ≤ {obj:g} ms; the table shows the rate of the best "
            "such step (all its calls answered OK, so offered = completed).",
            f"3. **Fixed load**: {fixed_how} ({_f(rate)}/s) for {a['fixed_s']:g} s on every system. CPU: CPU "
            "seconds of the server's whole process tree per wall second (`/proc`, as `bench.kit.machine` does); RSS: "
            "summed over the tree at the end of that run (PSS shares shared pages out, so it is the fairer figure "
            "for Ray's many processes).",
            "4. Servers are measured one at a time in the order naive, this service, Ray (Ray's daemons stay idle "
            "on the machine only after the others' sweeps); then the fixed-load runs, Ray first and stopped "
            "before the others. After each stop, any process left over from the server's tree is ended.",
            *([f"5. **Transport floor** (`transport_ceiling`, before the servers): the canned-answer server at "
               f"{TARGET_RAW:.0%} of the raw engine; its tree's CPU and the generator's (this process) over "
               f"{2 * 2 * a['engine_min_s']:g} s of that load alone, then raw-engine probes of "
               f"{2 * a['engine_min_s']:g} s alternating alone and under that load (the load starts 0.5 s "
               "before its probe and outlasts it), three alone and two loaded; the share is the loaded mean "
               "over the alone mean."] if results.get("transport") and "error" not in results["transport"]
              else []),
            ""]
    if plot:
        out += [f"![Peers: max throughput and p99 by offered load](docs/bench/{plot})", ""]
    out += ["### Sweep steps", "", "| system | offered/s | achieved/s | p50 ms | p99 ms | failed | verdict |",
            "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for name, s in {**sv, **(results.get("ray_variants") or {})}.items():
        for st in s["sweep"]["steps"]:
            lat = st["latency"]
            fails = ", ".join(f"{k} {v}" for k, v in st["failures"].items()) or "0"
            out.append(f"| {label(name)} | {st['offered_rate']:.1f} | {st['achieved_rate']:.1f} | "
                       f"{_f(lat['p50_ms'])} | {_f(lat['p99_ms'])} | {fails} | {st['verdict']} |")
    out += ["", "Reproduce: `make bench` (or `python -m bench.compare --model-repo model_repo --out bench_out`; "
            "`--quick` for a smoke run). Every number: `bench_out/compare/results.json`."]
    return "\n".join(out) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table_rows(results)
    obj = results["args"]["p99_objective_ms"]
    colors = {"raw": "tab:gray", "naive": "tab:orange", "ray": "tab:purple", "service": "tab:blue"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.0), dpi=80)
    names = [LABELS[r["system"]].replace(" (ORT alone)", "") for r in rows]
    vals = [r["max_rate"] for r in rows]
    bars = ax1.bar(names, vals, color=[colors[r["system"]] for r in rows])
    for b, v in zip(bars, vals, strict=True):
        ax1.annotate(f"{v:.0f}/s", (b.get_x() + b.get_width() / 2, v), textcoords="offset points", xytext=(0, 3),
                     ha="center", fontsize=8)
    ax1.set_ylabel("requests/s")
    ax1.set_title(f"Max throughput with p99 ≤ {obj:g} ms", fontsize=10)
    ax1.tick_params(axis="x", labelsize=8)
    for name, s in {**results["systems"], **(results.get("ray_variants") or {})}.items():
        steps = sorted(s["sweep"]["steps"], key=lambda st: st["offered_rate"])
        xs = [st["offered_rate"] for st in steps if st["latency"]["p99_ms"] is not None]
        ys = [st["latency"]["p99_ms"] for st in steps if st["latency"]["p99_ms"] is not None]
        variant = name.startswith("ray:")
        ax2.plot(xs, ys, "o--" if variant else "o-", color=colors["ray" if variant else name], alpha=0.5 if variant
                 else 1.0, label=label(name))
    ax2.axhline(obj, color="red", ls="--", lw=1, label=f"objective {obj:g} ms")
    ax2.axvline(results["raw"]["samples_per_s"], color="tab:gray", ls=":", lw=1, label="raw engine")
    ax2.set_yscale("log")
    ax2.set_xlabel("offered requests/s")
    ax2.set_ylabel("p99 latency (ms)")
    ax2.set_title("p99 by offered load (open-loop Poisson)", fontsize=10)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(args: argparse.Namespace, results: dict[str, Any], out_dir: Path) -> None:
    plot(results, out_dir / PNG)
    md = markdown(results, PNG)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    (out_dir / "summary.md").write_text(md)
    print()
    print(md)
    if not args.no_docs:
        args.docs_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out_dir / PNG, args.docs_dir / PNG)
        existing = args.benchmarks_md.read_text() if args.benchmarks_md.exists() else ""
        args.benchmarks_md.write_text(merge_section(existing, SECTION, md))


def encode_pairs(args: argparse.Namespace, encoder: FeatureEncoder
                 ) -> tuple[list[EncodedRequest], list[bytes], str, bool]:
    pairs = load_pairs(args.data)
    items, messages = [], []
    for p in pairs.pairs:
        try:
            items.append(encoder.encode(p.query, p.title or None))
        except FeatureError:
            continue  # the servers would refuse it too: not part of the load
        messages.append(scoring_pb2.ScoreRequest(query=p.query, title=p.title or None))
    return items, serialize_requests(messages), pairs.source, pairs.real


def batch_run_ms(raw: dict[str, Any], lanes: int) -> float:
    """How long one run of the raw engine's best batch takes on one lane."""
    return 1000.0 * raw["batch_size"] * lanes / raw["samples_per_s"] if raw["samples_per_s"] else 0.0


def objective_for(run_ms: float) -> float:
    """The default p99 objective: 100 ms (a scoring call sits inside a search request's budget), or, where
    one run of the best batch takes longer than 40 ms, 2.5 such runs rounded up to 50 ms: a call may find
    its lane busy with one and then run in the next, and a tighter objective would rule batching out on
    that machine (one thread per run on a 2-core CPU: ~170 ms per batch of 8), a looser one reward queueing."""
    return max(DEFAULT_OBJECTIVE_MS, 50.0 * math.ceil(2.5 * run_ms / 50.0))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = args.out / "compare"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.from_results is not None:
        write_outputs(args, json.loads(args.from_results.read_text()), out_dir)
        return 0
    results: dict[str, Any] = {"machine": machine_info(REPO_ROOT)}
    found = latest_complete(scan_model(args.model_repo, args.model, verify_checksums=False))
    if found is None or found.manifest is None or "fp32" not in found.manifest.precisions:
        print(f"no complete fp32 version of {args.model} in {args.model_repo}; run `make demo` first",
              file=sys.stderr)
        return 2
    version_dir, manifest = found.path.resolve(), found.manifest
    results["model"] = {"name": manifest.model, "version": manifest.version, "heads": len(manifest.heads),
                        "precision": "fp32", "path": str(version_dir)}
    items, requests, source, real = encode_pairs(args, FeatureEncoder(version_dir, manifest))
    results["data"] = {"source": source if real else "synthetic (the real pairs file is absent)",
                       "kind": "real" if real else "synthetic", "pairs": len(items)}
    log(f"data: {results['data']['source']}, {len(items)} pairs; model {manifest.model} v{manifest.version} fp32")

    engine = load_engine(version_dir, manifest, "fp32", *arrangement(args.threads))
    log(f"raw engine: batch sizes {args.batch_sizes}, {args.engine_rounds} round(s) of ≥ {args.engine_min_s:g} s")
    sweep = throughput_sweep({"fp32": engine}, items, args.batch_sizes, arrival_order_precisions=(),
                             rounds=args.engine_rounds, min_seconds=args.engine_min_s, progress=log)
    best = sweep["best"]["fp32"]
    results["raw"] = {"samples_per_s": best["samples_per_s"], "batch_size": best["batch_size"],
                      "rounds": args.engine_rounds, "by_batch_size": sweep["grouped"]["fp32"]}
    log(f"  raw engine best: {best['samples_per_s']:.1f} samples/s at batch {best['batch_size']}")
    results["objective_derived"] = args.p99_objective_ms <= 0
    if results["objective_derived"]:
        args.p99_objective_ms = objective_for(batch_run_ms(results["raw"], arrangement(args.threads)[1]))
        log(f"  p99 objective: {args.p99_objective_ms:g} ms (by the machine; --p99-objective-ms to choose)")

    if "ray" in args.systems and _ray_version() == "not installed":
        log("Ray Serve: ray is not installed (`make bench` installs requirements-bench.txt); leaving it out")
        args.systems = [s for s in args.systems if s != "ray"]
    work = make_workload("after", random.Random(5).sample(items, min(512, len(items))), best["batch_size"], True, 5)
    engine.run(work.batches[0])
    if not args.no_floor:
        results["transport"] = asyncio.run(transport_ceiling(args, engine, work, requests, version_dir, out_dir,
                                                             best["samples_per_s"]))
    systems = make_systems(args, out_dir, version_dir, manifest.version, requests[0])
    variants = [make_ray(args, out_dir, version_dir, requests[0], f"ray:{size}:{wait:g}", size, wait)
                for size, wait in args.ray_variants if "ray" in args.systems]
    asyncio.run(servers_phase(args, results, systems, variants, requests, best["samples_per_s"]))
    # The raw engine again, after the servers: shared machines drift, and the ratios assume they did not.
    results["raw"]["after_samples_per_s"] = round(probe(engine, work, 2 * args.engine_min_s), 1)
    log(f"raw engine after the servers: {results['raw']['after_samples_per_s']:.1f} samples/s at batch "
        f"{best['batch_size']} (before: {best['samples_per_s']:.1f})")
    results["systems"] = {s.name: {"config": s.config, **s.out} for s in systems if "sweep" in s.out}
    results["ray_variants"] = {s.name: {"config": s.config, **s.out} for s in variants if "sweep" in s.out}
    results["not_measured"] = {s.name: s.out.get("error", "") for s in [*systems, *variants] if "sweep" not in s.out}
    results["table"] = table_rows(results)
    results["targets"] = targets(results)
    results["elapsed_s"] = round(time.perf_counter() - T0, 1)
    results["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_outputs(args, results, out_dir)
    log(f"done in {results['elapsed_s']:.0f} s; results in {out_dir}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The sustainable rate, one search for every benchmark: open-loop steps in fractions of a limit, judged by
`loadtest.sweep.judge`, bisected; a step disturbed by other processes is run again."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from bench.kit.cli import Progress
from bench.kit.data import REPO_ROOT
from bench.kit.fmt import num
from bench.kit.machine import CpuMonitor
from bench.kit.scrape import batch_stats
from bench.kit.server import ServerProcess
from loadtest.openloop import SCORE_METHOD, LoadConfig, run_open_loop
from loadtest.sweep import KEEP_UP, judge, next_rate


@dataclass(frozen=True)
class SweepConfig:
    limit: float  # requests/s that fraction 1.0 stands for
    fractions: Sequence[float]
    step_s: float = 15.0
    timeout_s: float = 5.0
    p99_bound_ms: float = 1000.0
    refine: int = 3
    seed: int = 1
    noisy_cores: float = 0.3
    max_reruns: int = 2
    max_fraction: float = 3.0
    method: str = SCORE_METHOD  # or loadtest.callers.STREAM_METHOD: each request an item on `streams` streams
    streams: int = 4


Step = dict[str, Any]


async def run_step(server: ServerProcess, channel: grpc.aio.Channel, requests: Sequence[bytes], fraction: float,
                   cfg: SweepConfig, probe: Callable[[], float] | None, progress: Progress, label: str) -> Step:
    """One open-loop step at `fraction` × the limit, judged; the server's CPU is its whole process tree when it
    runs workers."""
    rate = fraction * cfg.limit
    probe_before = probe() if probe else None
    monitor = CpuMonitor(server.pid, tree=server.spec.workers > 1)
    before = await server.ascrape()
    monitor.start()
    load = LoadConfig(rate=rate, duration_s=cfg.step_s, timeout_s=cfg.timeout_s,
                      seed=cfg.seed + int(fraction * 1000), method=cfg.method, streams=cfg.streams)
    result = await run_open_loop(channel, requests, load)
    cpu: dict[str, Any] = monitor.stop()
    if server.spec.workers > 1:
        cpu["server_event_loop_cores"] = None  # the supervisor's main thread: no worker's event loop
    after = await server.ascrape()
    summary = result.summary()
    ok, why = judge(summary, cfg.p99_bound_ms)
    step = {"fraction": round(fraction, 4), "offered_rate_target": round(rate, 3), **summary, "sustainable": ok,
            "verdict": why, "server": batch_stats(before, after, cpu["wall_s"]), "cpu": cpu,
            "engine_probe_before": round(probe_before, 2) if probe_before is not None else None}
    lat = summary["latency"]
    progress(f"  {label} {fraction:>5.0%} of limit: offered {summary['offered_rate']:7.1f}/s  achieved "
             f"{summary['achieved_rate']:7.1f}/s  p50 {num(lat['p50_ms']):>7} ms  p99 {num(lat['p99_ms']):>7} ms  "
             f"batch {step['server']['mean_batch_size']}  server CPU {cpu['server_cores']:.2f}  generator "
             f"{cpu['bench_cores']:.2f}  foreign {cpu['foreign_cores']:.2f}  -> {'OK' if ok else why}")
    return step


def next_fraction(steps: Sequence[Step], min_gap: float = 0.04, max_fraction: float = 3.0) -> float | None:
    """`loadtest.sweep.next_rate` on fractions: bisects between the highest sustainable step and the lowest failing
    one above it (until they are `min_gap` apart); halves the lowest step when none was sustainable (down to 0.05);
    goes 25% higher when all were (not past `max_fraction`)."""
    lo = max((s["fraction"] for s in steps if s["sustainable"]), default=1.0)
    f = next_rate([{"target_rate": s["fraction"], "sustainable": s["sustainable"]} for s in steps], growth=1.25,
                  min_gap=min_gap / lo, min_rate=0.05)
    return f if f is not None and (f <= max_fraction or any(s["fraction"] > f for s in steps)) else None


async def warm_up(channel: grpc.aio.Channel, requests: Sequence[bytes], cfg: SweepConfig) -> None:
    """Connection, first-call paths and the engine's shapes: not measured."""
    await run_open_loop(channel, requests, LoadConfig(rate=max(2.0, 0.2 * cfg.limit), duration_s=3.0,
                                                      timeout_s=cfg.timeout_s, seed=cfg.seed, method=cfg.method,
                                                      streams=cfg.streams))


async def search(measure: Callable[[float], Awaitable[Step]], cfg: SweepConfig) -> list[Step]:
    """The one rate search: `measure` each of the grid's fractions, then up to `cfg.refine` more chosen by
    `next_fraction`; the steps sorted by fraction."""
    steps = [await measure(f) for f in sorted(cfg.fractions)]
    for _ in range(cfg.refine):
        f = next_fraction(steps, max_fraction=cfg.max_fraction)
        if f is None:
            break
        steps.append(await measure(f))
    return sorted(steps, key=lambda s: s["fraction"])


def outcome(steps: Sequence[Step], limit: float) -> dict[str, Any]:
    """The best sustainable step and the most completed per second at any step, in requests/s and × `limit`."""
    best = max((s for s in steps if s["sustainable"]), key=lambda s: s["achieved_rate"], default=None)
    top = max(steps, key=lambda s: s["achieved_rate"])
    return {"max_sustained_rate": best["achieved_rate"] if best else 0.0,
            "max_sustained_fraction_offered": best["fraction"] if best else 0.0,
            "max_sustained_ratio": round(best["achieved_rate"] / limit, 4) if best else 0.0,
            "p99_at_max_sustained_ms": best["latency"]["p99_ms"] if best else None,
            "saturation_rate": top["achieved_rate"], "saturation_ratio": round(top["achieved_rate"] / limit, 4),
            "saturation_step_fraction": top["fraction"]}


async def sweep(server: ServerProcess, requests: Sequence[bytes], cfg: SweepConfig, *, label: str,
                probe: Callable[[], float] | None = None, progress: Progress = print) -> dict[str, Any]:
    """`search` on one channel after a `warm_up`; a step during which other processes used more than
    `cfg.noisy_cores` is run again (at most `cfg.max_reruns` times in all) and the quieter attempt kept."""
    reruns = 0

    async def measured(channel: grpc.aio.Channel, fraction: float) -> Step:
        nonlocal reruns
        step = await run_step(server, channel, requests, fraction, cfg, probe, progress, label)
        while step["cpu"]["foreign_cores"] > cfg.noisy_cores and reruns < cfg.max_reruns:
            reruns += 1
            progress(f"  other processes used {step['cpu']['foreign_cores']:.2f} cores during that step; "
                     f"running it again ({reruns}/{cfg.max_reruns})")
            again = await run_step(server, channel, requests, fraction, cfg, probe, progress, label)
            history = step.pop("discarded_attempts", [])
            quieter = again["cpu"]["foreign_cores"] < step["cpu"]["foreign_cores"]
            keep, drop = (again, step) if quieter else (step, again)
            keep["discarded_attempts"] = [*history, {k: drop[k] for k in ("achieved_rate", "latency", "failures",
                                                                           "cpu", "verdict")}]
            step = keep
        return step

    async with grpc.aio.insecure_channel(server.target) as channel:
        await warm_up(channel, requests, cfg)
        steps = await search(lambda f: measured(channel, f), cfg)
    probes = [s["engine_probe_before"] for s in steps if s["engine_probe_before"] is not None]
    return {"limit": round(cfg.limit, 2), "step_s": cfg.step_s, "timeout_s": cfg.timeout_s,
            "p99_bound_ms": cfg.p99_bound_ms, "keep_up": KEEP_UP, "steps": steps, **outcome(steps, cfg.limit),
            "engine_probes": {"min": min(probes), "max": max(probes), "n": len(probes)} if probes else None,
            "reruns": reruns}


CACHE_MAX_AGE_S = 6 * 3600.0


def server_code_hash() -> str:
    """What the server runs: `server/` and the version format it reads requests with."""
    digest = hashlib.sha256()
    for path in sorted([*(REPO_ROOT / "server").rglob("*.py"), *(REPO_ROOT / "model_format").rglob("*.py")]):
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


async def measure_rate(server: ServerProcess, requests: Sequence[bytes], *, quick: bool, timeout_s: float,
                       probe_rate: float, progress: Progress) -> dict[str, Any]:
    """Capacity probe (overloaded for a few seconds: OK answers per second), then `bench.kit.rates.sweep`
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

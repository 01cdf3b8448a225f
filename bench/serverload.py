"""Step 4: the server under open-loop Poisson load, stepped in fractions of the raw engine's throughput.

A step is *sustainable* when every call succeeded, the achieved rate kept up with the offered rate
(at least `KEEP_UP` of it) and p99 stayed under the latency bound. The server's max sustained
throughput is the highest achieved rate of a sustainable step. After the grid, the gap between the
highest sustainable step and the next failing one is bisected (or, when every step was sustainable,
the grid is extended upwards) `refine` times.

Shared machines: a step during which other processes used more than `noisy_cores` of CPU is run again
(at most `max_reruns` times per sweep) and the attempt with the least interference is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from bench.server import ServerProcess, batch_stats
from bench.sysmon import CpuMonitor
from loadtest.openloop import LoadConfig, run_open_loop
from loadtest.sweep import KEEP_UP, judge  # one rule for every sweep


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


async def run_step(
    server: ServerProcess,
    channel: grpc.aio.Channel,
    requests: Sequence[bytes],
    fraction: float,
    cfg: SweepConfig,
    probe: Callable[[], float] | None,
    progress: Callable[[str], None],
    label: str,
) -> dict[str, Any]:
    rate = fraction * cfg.limit
    probe_before = probe() if probe else None
    monitor = CpuMonitor(server.pid)
    before = await server.ascrape()
    monitor.start()
    load = LoadConfig(rate=rate, duration_s=cfg.step_s, timeout_s=cfg.timeout_s,
                      seed=cfg.seed + int(fraction * 1000))
    result = await run_open_loop(channel, requests, load)
    cpu = monitor.stop()
    after = await server.ascrape()
    summary = result.summary()
    ok, why = judge(summary, cfg.p99_bound_ms)
    step = {
        "fraction": round(fraction, 4),
        "offered_rate_target": round(rate, 3),
        **summary,
        "sustainable": ok,
        "verdict": why,
        "server": batch_stats(before, after, cpu["wall_s"]),
        "cpu": cpu,
        "engine_probe_before": round(probe_before, 2) if probe_before is not None else None,
    }
    lat = summary["latency"]
    progress(f"  {label} {fraction:>5.0%} of limit: offered {summary['offered_rate']:7.1f}/s  achieved "
             f"{summary['achieved_rate']:7.1f}/s  p50 {lat['p50_ms'] or float('nan'):8.1f} ms  p99 "
             f"{lat['p99_ms'] or float('nan'):8.1f} ms  batch {step['server']['mean_batch_size']}  "
             f"foreign CPU {cpu['foreign_cores']:.2f}  -> {'OK' if ok else why}")
    return step


def next_fraction(steps: list[dict[str, Any]], min_gap: float = 0.04, max_fraction: float = 3.0) -> float | None:
    """Bisects between the highest sustainable step and the lowest failing one above it; halves the lowest
    step when none was sustainable; goes 25% higher when all were."""
    good = [s["fraction"] for s in steps if s["sustainable"]]
    if not good:
        lowest = min(s["fraction"] for s in steps)
        return lowest / 2 if lowest / 2 >= 0.05 else None
    lo = max(good)
    above = [s["fraction"] for s in steps if not s["sustainable"] and s["fraction"] > lo]
    if not above:
        return lo * 1.25 if lo * 1.25 <= max_fraction else None
    hi = min(above)
    return (lo + hi) / 2 if hi - lo >= min_gap else None


async def sweep(
    server: ServerProcess,
    requests: Sequence[bytes],
    cfg: SweepConfig,
    *,
    label: str,
    probe: Callable[[], float] | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    reruns = 0

    async def measured(channel: grpc.aio.Channel, fraction: float) -> dict[str, Any]:
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
        # Connection, first-call paths and the engine's shapes: not measured.
        await run_open_loop(channel, requests, LoadConfig(rate=max(2.0, 0.2 * cfg.limit), duration_s=3.0,
                                                          timeout_s=cfg.timeout_s, seed=cfg.seed))
        for f in sorted(cfg.fractions):
            steps.append(await measured(channel, f))
        for _ in range(cfg.refine):
            f_next = next_fraction(steps, max_fraction=cfg.max_fraction)
            if f_next is None:
                break
            steps.append(await measured(channel, f_next))
    steps.sort(key=lambda s: s["fraction"])
    good = [s for s in steps if s["sustainable"]]
    best = max(good, key=lambda s: s["achieved_rate"]) if good else None
    saturated = max(steps, key=lambda s: s["achieved_rate"])
    probes = [s["engine_probe_before"] for s in steps if s["engine_probe_before"] is not None]
    return {
        "limit": round(cfg.limit, 2),
        "step_s": cfg.step_s,
        "timeout_s": cfg.timeout_s,
        "p99_bound_ms": cfg.p99_bound_ms,
        "keep_up": KEEP_UP,
        "steps": steps,
        "max_sustained_rate": best["achieved_rate"] if best else 0.0,
        "max_sustained_fraction_offered": best["fraction"] if best else 0.0,
        "max_sustained_ratio": round(best["achieved_rate"] / cfg.limit, 4) if best else 0.0,
        "saturation_rate": saturated["achieved_rate"],
        "saturation_ratio": round(saturated["achieved_rate"] / cfg.limit, 4),
        "saturation_step_fraction": saturated["fraction"],
        "engine_probes": {"min": min(probes), "max": max(probes), "n": len(probes)} if probes else None,
        "reruns": reruns,
    }

"""The highest offered rate a server sustains under a p99 latency objective (open-loop steps).

    async with grpc.aio.insecure_channel(target) as channel:
        found = await find_max_rate(channel, requests, p99_objective_ms=50, start_rate=20, step_s=10,
                                    timeout_s=5, refine=4)
    found["max_rate"]  # requests/s offered in the best sustainable step (0.0 when none was)

A step is *sustainable* when every call returned OK, the achieved rate kept up with the offered rate
(at least `KEEP_UP` = 95% of it) and p99 stayed at or under the objective: the same test as
the benchmarks' rate search (`bench.kit.rates`). The search is a grid, then a bisection:

1. grid: `start_rate`, then `growth` times the highest rate so far while every step is sustainable
   (halving instead while none is), until a step fails, `max_rate` is reached or `max_grid_steps`;
2. bisection: `refine` more steps, each halfway between the highest sustainable rate and the lowest
   failing rate above it, stopping early once the two are within `min_gap` (relative) of each other.

Each step is its own open-loop run (`run_open_loop`): Poisson arrivals, latency from the scheduled
send time, every answer awaited before the next step, so one overloaded step's backlog never leaks
into the next. The steps' summaries are returned with the verdicts, so a caller can plot or re-judge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from loadtest.openloop import SCORE_METHOD, Arrival, LoadConfig, run_open_loop

KEEP_UP = 0.95  # achieved / offered below this = the server (or the generator) fell behind


def judge(summary: Mapping[str, Any], p99_objective_ms: float) -> tuple[bool, str]:
    """(sustainable, why) for one run's summary (`RunResult.summary()`); why is "ok" when sustainable."""
    failures = summary["failures"]
    if failures:
        return False, "failures: " + ", ".join(f"{k} {v}" for k, v in failures.items())
    if summary["achieved_rate"] < KEEP_UP * summary["offered_rate"]:
        return False, f"achieved {summary['achieved_rate']:.1f}/s of {summary['offered_rate']:.1f}/s offered"
    p99 = summary["latency"]["p99_ms"]
    if p99 is None or p99 > p99_objective_ms:
        return False, f"p99 {p99} ms over the {p99_objective_ms:g} ms objective"
    return True, "ok"


def next_rate(
    steps: Sequence[Mapping[str, Any]],
    *,
    growth: float = 2.0,
    min_gap: float = 0.05,
    min_rate: float = 0.5,
    max_rate: float | None = None,
) -> float | None:
    """The rate to try after `steps` (each with "target_rate" and "sustainable"), or None to stop.

    None sustainable: half the lowest tried (None below `min_rate`). All sustainable: `growth` times
    the highest (capped at `max_rate`; None once it was tried). Otherwise halfway between the highest
    sustainable rate and the lowest failing rate above it, None once they are within `min_gap` of each
    other (relative to the sustainable one).
    """
    if not steps:
        raise ValueError("next_rate needs at least one measured step")
    tried = [float(s["target_rate"]) for s in steps]
    good = [float(s["target_rate"]) for s in steps if s["sustainable"]]
    if not good:
        lower = min(tried) / 2
        return lower if lower >= min_rate else None
    lo = max(good)
    above = [r for r, s in zip(tried, steps, strict=True) if not s["sustainable"] and r > lo]
    if not above:
        higher = lo * growth if max_rate is None else min(lo * growth, max_rate)
        return higher if higher > lo * (1 + min_gap) else None
    hi = min(above)
    return (lo + hi) / 2 if hi - lo >= min_gap * lo else None


async def find_max_rate(
    channel: grpc.aio.Channel,
    requests: Sequence[bytes],
    *,
    p99_objective_ms: float,
    start_rate: float,
    step_s: float,
    timeout_s: float,
    refine: int,
    metadata: tuple[tuple[str, str], ...] = (),
    method: str = SCORE_METHOD,
    streams: int = 4,
    arrival: Arrival = "poisson",
    growth: float = 2.0,
    max_rate: float | None = None,
    min_gap: float = 0.05,
    max_grid_steps: int = 12,
    warmup_s: float | None = None,
    seed: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Searches for the highest offered rate that is sustainable under `p99_objective_ms` (see the module).

    `requests` are serialized request messages for `method`; `metadata` is sent with every call.
    Before the first step the server is warmed for `warmup_s` (default: min(3, step_s)) at
    `start_rate`, unmeasured: connection set-up and first-call paths are not what is being measured.
    `progress(line)` gets one line per step.

    Returns a JSON-friendly dict: "max_rate" (offered target of the best sustainable step, 0.0 when
    none), "max_offered_rate" / "max_achieved_rate" / "p99_at_max_ms" of that step, "bracketed" (a
    failing rate above it was measured; False means the max is only a lower bound), "saturation_rate"
    (the highest achieved rate of any step), "generator_cpu_cores_max" and "generator_lagging_steps"
    (steps whose sends left more than max(1 ms, 10% of the objective) late at p99: the generator was
    short of CPU), "steps" (every step's summary with "target_rate", "phase", "sustainable", "verdict"
    and "generator_lagging", by rate), and the settings.
    """
    if p99_objective_ms <= 0 or start_rate <= 0 or step_s <= 0 or timeout_s <= 0:
        raise ValueError("p99_objective_ms, start_rate, step_s and timeout_s must be positive")
    if refine < 0 or growth <= 1:
        raise ValueError("refine must be >= 0 and growth > 1")
    say = progress or (lambda _line: None)
    steps: list[dict[str, Any]] = []

    def config(rate: float, duration_s: float, step_seed: int) -> LoadConfig:
        return LoadConfig(rate=rate, duration_s=duration_s, arrival=arrival, timeout_s=timeout_s, method=method,
                          seed=step_seed, metadata=metadata, streams=streams)

    async def measure(rate: float, phase: str) -> None:
        result = await run_open_loop(channel, requests, config(rate, step_s, seed + len(steps) + 1))
        summary = result.summary()
        ok, why = judge(summary, p99_objective_ms)
        # Sends that left late mean the generator, not the server, was short of CPU: its latency counts anyway
        # (no coordinated omission) but the step then says more about this machine than about the server.
        lagging = (summary["send_lag_p99_ms"] or 0.0) > max(1.0, 0.1 * p99_objective_ms)
        steps.append({"target_rate": round(rate, 3), "phase": phase, **summary, "sustainable": ok, "verdict": why,
                      "generator_lagging": lagging})
        lat = summary["latency"]
        say(f"  {phase:6} {rate:9.1f}/s offered {summary['offered_rate']:9.1f}/s  achieved "
            f"{summary['achieved_rate']:9.1f}/s  p50 {_ms(lat['p50_ms'])}  p99 {_ms(lat['p99_ms'])}  "
            f"generator {summary['generator_cpu_cores'] or 0.0:.2f} cores"
            + (f" (sends late: p99 {summary['send_lag_p99_ms']:.1f} ms)" if lagging else "")
            + f"  -> {'sustainable' if ok else why}")

    if start_rate * step_s < 200:
        # The keep-up and p99 verdicts are counts over the step; with few calls Poisson noise alone can fail
        # a step (p99 of 50 samples is nearly the max), and one noisy failure stops the grid early.
        say(f"  note: the first step has about {start_rate * step_s:.0f} calls; verdicts on so few are noisy "
            "(longer steps or a higher start rate help)")
    warm = min(3.0, step_s) if warmup_s is None else warmup_s
    if warm > 0:
        say(f"  warm-up {warm:g} s at {start_rate:g}/s (not measured)")
        await run_open_loop(channel, requests, config(start_rate, warm, seed))
    await measure(start_rate, "grid")
    while len(steps) < max_grid_steps and all(s["sustainable"] == steps[0]["sustainable"] for s in steps):
        rate = next_rate(steps, growth=growth, min_gap=min_gap, max_rate=max_rate)
        if rate is None:
            break
        await measure(rate, "grid")
    for _ in range(refine):
        rate = next_rate(steps, growth=growth, min_gap=min_gap, max_rate=max_rate)
        if rate is None:
            break
        await measure(rate, "refine")
    return summarize_sweep(steps, p99_objective_ms=p99_objective_ms, settings={
        "start_rate": start_rate, "step_s": step_s, "timeout_s": timeout_s, "refine": refine, "growth": growth,
        "max_rate_cap": max_rate, "arrival": arrival, "method": method,
        "metadata_keys": [k for k, _ in metadata],  # values may be credentials: never written out
        "warmup_s": warm,
    })


def summarize_sweep(steps: Sequence[Mapping[str, Any]], *, p99_objective_ms: float,
                    settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The sweep's answer from its judged steps (see `find_max_rate` for the keys)."""
    ordered = sorted(steps, key=lambda s: float(s["target_rate"]))
    good = [s for s in ordered if s["sustainable"]]
    best = max(good, key=lambda s: float(s["target_rate"])) if good else None
    above = [s for s in ordered if not s["sustainable"] and best is not None
             and float(s["target_rate"]) > float(best["target_rate"])]
    return {
        "p99_objective_ms": p99_objective_ms,
        "keep_up": KEEP_UP,
        **(settings or {}),
        "max_rate": float(best["target_rate"]) if best else 0.0,
        "max_offered_rate": best["offered_rate"] if best else 0.0,
        "max_achieved_rate": best["achieved_rate"] if best else 0.0,
        "p99_at_max_ms": best["latency"]["p99_ms"] if best else None,
        "first_failing_rate": float(above[0]["target_rate"]) if above else None,
        "bracketed": bool(above),
        "saturation_rate": max((float(s["achieved_rate"]) for s in ordered), default=0.0),
        "generator_cpu_cores_max": max((float(s["generator_cpu_cores"] or 0.0) for s in ordered), default=0.0),
        "generator_lagging_steps": sum(bool(s.get("generator_lagging")) for s in ordered),
        "steps": [dict(s) for s in ordered],
    }


def _ms(value: float | None) -> str:
    return f"{value:8.1f} ms" if value is not None else "       - ms"

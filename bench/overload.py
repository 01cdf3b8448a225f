"""python -m bench.overload --model-repo model_repo --out bench_out [--quick]

Issue 8.2, graceful overload: offered `--overload-factor` (3) × the sustainable rate, the server must refuse
the excess fast with RESOURCE_EXHAUSTED, keep its queue bounded, keep the p99 of what it admits within
`--target-p99-ratio` (2) × its value at normal load, keep its memory flat and keep doing useful work.

1. The real server (`python -m server`, fp32, result cache off) on a throw-away copy of the repository.
2. The sustainable rate S (`bench.kit.rates`: cached for the same server code and flags, else measured).
3. Open-loop Poisson load in three phases: normal (`--normal-fraction` × S), overload (factor × S),
   recovery (normal again). /metrics (queue depth) and /proc (RSS, CPU) are sampled every 0.5 s.
4. Each phase is judged on the calls scheduled in it, after `--settle-s` (the queue needs a moment to fill
   or empty; the transient is in the plot and the per-chunk lines).

Writes bench_out/overload/{results.json, overload.png, section.md, server.log} and the `overload` section
of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.kit.cli import add_common_args, logger, throughput_flags
from bench.kit.data import load_requests
from bench.kit.fmt import num, verdict
from bench.kit.machine import machine, machine_line
from bench.kit.publish import publish_docs, write_results
from bench.kit.rates import obtain_rate, rate_sentence
from bench.kit.server import start_server
from bench.kit.swap import temp_repo
from bench.kit.timeline import REFUSED, Sampler, Segment, chunk_line, plot_timeline, run_segments
from loadtest.openloop import LoadResult

NAME = "overload"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--normal-fraction", type=float, default=0.7,
                    help="normal load as a fraction of the sustainable rate (the capacity-planning share)")
    ap.add_argument("--overload-factor", type=float, default=3.0, help="overload as a multiple of it")
    ap.add_argument("--normal-s", type=float, default=20.0)
    ap.add_argument("--overload-s", type=float, default=45.0)
    ap.add_argument("--recovery-s", type=float, default=15.0)
    ap.add_argument("--settle-s", type=float, default=2.0, help="start of each phase left out of its numbers")
    ap.add_argument("--target-p99-ratio", type=float, default=2.0,
                    help="admitted p99 under overload / p99 at normal load must stay at or below this")
    ap.add_argument("--target-refusal-p99-ms", type=float, default=100.0,
                    help="refusals count as fast when their p99 stays at or below this")
    ap.add_argument("--target-throughput", type=float, default=0.9,
                    help="OK/s under overload must stay at or above this fraction of the sustainable rate")
    ap.add_argument("--target-rss-growth", type=float, default=0.10,
                    help="RSS during and after overload must stay within this share above the normal-load RSS")
    args = ap.parse_args(argv)
    if args.quick:
        args.normal_s, args.overload_s, args.recovery_s = 10.0, 15.0, 8.0
    return args


def queue_limit(server_args: str) -> int:
    """The server's --max-queue-size (its default unless passed with --server-args)."""
    parts = server_args.split()
    if "--max-queue-size" in parts:
        return int(parts[parts.index("--max-queue-size") + 1])
    from server.batcher import BatcherConfig

    return BatcherConfig().max_queue_size


async def run(args: argparse.Namespace) -> dict[str, Any]:
    log = logger(NAME)
    out = args.out / NAME
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "args": {k: str(v) if isinstance(v, Path) else v
                                                              for k, v in vars(args).items()}}
    with temp_repo(args.model_repo, args.model, out) as (root, src):
        work = load_requests(src, args.data)
        log(f"data: {work.source}: {work.pairs} pairs; model {args.model}/{src.name}")
        flags = throughput_flags(args)
        server = await asyncio.to_thread(start_server, root, [*flags, "--poll-interval-s", "0",
                                                              "--log-level", "WARNING"], out / "server.log", log)
        try:
            rate = await obtain_rate(server, work.requests, args, flags, log)
            s = rate["rate"]
            normal, over = args.normal_fraction * s, args.overload_factor * s
            segments = [Segment("normal", normal, args.normal_s), Segment("overload", over, args.overload_s),
                        Segment("recovery", normal, args.recovery_s)]
            log(f"phases: normal {normal:.1f}/s for {args.normal_s:.0f} s, overload {over:.1f}/s for "
                f"{args.overload_s:.0f} s, recovery {normal:.1f}/s for {args.recovery_s:.0f} s")
            t0 = time.perf_counter() + 0.5
            sampler = Sampler(server, t0, 0.5)
            sampler.start()

            def progress(seg: Segment, start: float, res: LoadResult) -> None:
                log(chunk_line(seg, start, res, sampler))

            async with grpc.aio.insecure_channel(server.target) as channel:
                calls = await run_segments(channel, work.requests, segments, t0=t0, chunk_s=5.0,
                                           timeout_s=args.timeout_s, seed=args.seed, on_chunk=progress)
            await asyncio.sleep(1.0)  # one more sample after the last answer
            samples = await sampler.stop()
            alive = server.proc is not None and server.proc.poll() is None
        finally:
            await asyncio.to_thread(server.stop)

    bounds, t = {}, 0.0
    for seg in segments:
        bounds[seg.name] = (t, t + seg.seconds)
        t += seg.seconds
    phases = {name: calls.stats(lo + args.settle_s, hi) for name, (lo, hi) in bounds.items()}
    for name, (lo, hi) in bounds.items():
        smp = sampler.between(lo, hi + (1.5 if name == "recovery" else 0.0))
        depths = [x.queue_depth for x in smp if x.queue_depth is not None]
        phases[name]["queue_depth"] = ({"max": max(depths), "mean": round(float(np.mean(depths)), 1),
                                        "samples": len(depths)} if depths else None)
        phases[name]["rss_mib"] = ({"median": float(np.median([x.rss_mib for x in smp])),
                                    "max": max(x.rss_mib for x in smp)} if smp else None)
        phases[name]["server_cores"] = round(float(np.mean([x.server_cores for x in smp])), 2) if smp else None
        phases[name]["foreign_cores"] = round(float(np.mean([x.foreign_cores for x in smp])), 2) if smp else None
    results.update({
        "rate": rate, "sustainable_rate": s, "normal_rate": round(normal, 2), "overload_rate": round(over, 2),
        "data": work.source, "server_flags": flags, "queue_limit": queue_limit(args.server_args),
        "phases": phases, "server_alive_at_end": alive, "chunks": calls.chunks,
        "samples": [vars(x) for x in samples],
    })
    results["checks"] = checks(results, args)
    png = plot_timeline(calls, samples, out / "overload.png",
                        f"Overload: {over:.0f} req/s offered ({args.overload_factor:g}× the sustainable {s:.0f}/s), "
                        f"normal {normal:.0f}/s before and after", bin_s=1.0,
                        phases=[(n, lo, hi) for n, (lo, hi) in bounds.items()], reference_rate=s)
    results["plot"] = str(png)
    write_results(out, results)
    md = markdown(results, args)
    print()
    print(md)
    publish_docs(args, NAME, md, [png], log)
    return results


def checks(r: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each target with its measured value; `met` is None when it could not be measured."""
    p = r["phases"]
    nrm, ovl, rec = p["normal"], p["overload"], p["recovery"]
    s = r["sustainable_rate"]
    out: list[dict[str, Any]] = []

    def add(what: str, value: str, target: str, met: bool | None) -> None:
        out.append({"what": what, "value": value, "target": target, "met": met})

    qd = ovl["queue_depth"]
    add("queue stays bounded (max depth under overload, /metrics every 0.5 s)",
        f"{qd['max']:.0f} items (mean {qd['mean']:.0f})" if qd else "not scraped",
        f"≤ {r['queue_limit']} (--max-queue-size)", qd["max"] <= r["queue_limit"] if qd else None)
    other = {k: v for k, v in ovl["failures"].items() if k != REFUSED}
    refused = ovl["failures"].get(REFUSED, 0)
    add("the excess is refused with RESOURCE_EXHAUSTED (other failures under overload)",
        f"{refused} refused ({refused / max(ovl['calls'], 1):.0%} of calls); other: "
        + (", ".join(f"{k} {v}" for k, v in other.items()) or "none"), "no other failure", not other)
    rl = ovl["refused_latency"]
    add("refusals come back fast (p50 / p99 / max of refused calls)",
        f"{num(rl['p50_ms'])} / {num(rl['p99_ms'])} / {num(rl['max_ms'])} ms",
        f"p99 ≤ {args.target_refusal_p99_ms:g} ms", rl["p99_ms"] <= args.target_refusal_p99_ms
        if rl["p99_ms"] is not None else None)
    p99n, p99o = nrm["ok_latency"]["p99_ms"], ovl["ok_latency"]["p99_ms"]
    ratio = p99o / p99n if p99n and p99o else None
    add("p99 of admitted (OK) calls under overload vs normal load",
        f"{num(p99o)} vs {num(p99n)} ms = {ratio:.2f}×" if ratio else "–",
        f"≤ {args.target_p99_ratio:g}×", ratio <= args.target_p99_ratio if ratio else None)
    tp = ovl["ok_rate"] or 0.0
    add("admitted throughput under overload (OK/s) vs the sustainable rate",
        f"{tp:.1f} vs {s:.1f}/s = {tp / s:.2f}×", f"≥ {args.target_throughput:g}× (no collapse)",
        tp >= args.target_throughput * s)
    rss_n = nrm["rss_mib"]["median"] if nrm["rss_mib"] else None
    rss_o = ovl["rss_mib"]["max"] if ovl["rss_mib"] else None
    rss_r = rec["rss_mib"]["median"] if rec["rss_mib"] else None
    flat = (rss_n is not None and rss_o is not None and rss_r is not None
            and max(rss_o, rss_r) <= rss_n * (1 + args.target_rss_growth))
    add("server RSS: normal (median) / overload (max) / recovery (median)",
        f"{rss_n:,.0f} / {rss_o:,.0f} / {rss_r:,.0f} MiB" if rss_n and rss_o and rss_r else "–",
        f"flat: ≤ +{args.target_rss_growth:.0%}", flat)
    p99r = rec["ok_latency"]["p99_ms"]
    add("recovery: failures and p99 back at normal load",
        f"{rec['failed']} failed, p99 {num(p99r)} ms", f"0 failed, p99 ≤ {args.target_p99_ratio:g}× normal",
        rec["failed"] == 0 and p99r is not None and p99n is not None and p99r <= args.target_p99_ratio * p99n)
    add("server still running at the end", str(r["server_alive_at_end"]), "yes", r["server_alive_at_end"])
    return out


def markdown(r: dict[str, Any], args: argparse.Namespace) -> str:
    p = r["phases"]
    lines = [
        "## Overload (`python -m bench.overload`)",
        "",
        f"Issue 8.2: offered {args.overload_factor:g}× the sustainable rate, the server must refuse the excess "
        "fast (RESOURCE_EXHAUSTED), keep its queue bounded, keep the latency of what it admits near its normal "
        "value, keep its memory flat and keep its throughput. The real server (`python -m server`, "
        f"{' '.join(r['server_flags'])}) under open-loop Poisson load (`loadtest.openloop`: latency from the "
        f"scheduled send, deadline {args.timeout_s:g} s): normal {r['normal_rate']:.1f}/s "
        f"({args.normal_fraction:.0%} of the sustainable rate) for {args.normal_s:.0f} s, overload "
        f"{r['overload_rate']:.1f}/s for {args.overload_s:.0f} s, normal again for {args.recovery_s:.0f} s. Each "
        f"phase's numbers leave out its first {args.settle_s:g} s. Queue depth from the server's /metrics, RSS and "
        "CPU from /proc, every 0.5 s.",
        "",
        machine_line(r["machine"]),
        f"Sustainable rate: {rate_sentence(r['rate'])}. Data: {r['data']}.",
        "",
        "| phase | offered/s | OK/s | refused (RESOURCE_EXHAUSTED) | other failures | OK p50 ms | OK p99 ms | "
        "refused p50 ms | refused p99 ms | max queue depth | RSS MiB (median) | server CPU (cores) | "
        "foreign CPU (cores) |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("normal", "overload", "recovery"):
        ph = p[name]
        other = ", ".join(f"{k} {v}" for k, v in ph["failures"].items() if k != REFUSED) or "0"
        qd = ph["queue_depth"]
        lines.append(
            f"| {name} | {ph['offered_rate']:.1f} | {ph['ok_rate']:.1f} | {ph['failures'].get(REFUSED, 0)} | "
            f"{other} | {num(ph['ok_latency']['p50_ms'])} | {num(ph['ok_latency']['p99_ms'])} | "
            f"{num(ph['refused_latency']['p50_ms'])} | {num(ph['refused_latency']['p99_ms'])} | "
            f"{_num(qd['max'] if qd else None)} | {_num(ph['rss_mib']['median'] if ph['rss_mib'] else None)} | "
            f"{ph['server_cores']} | {ph['foreign_cores']} |")
    lines += ["", "| target | measured | bound | |", "| --- | --- | --- | --- |"]
    for c in r["checks"]:
        lines.append(f"| {c['what']} | {c['value']} | {c['target']} | "
                     f"{'not measured' if c['met'] is None else verdict(c['met'])} |")
    unmet = [c["what"] for c in r["checks"] if c["met"] is False]
    lines += ["", f"**{len(r['checks']) - len(unmet)} of {len(r['checks'])} targets met**"
              + (f"; not met: {'; '.join(unmet)}." if unmet else "."), "",
              "![Latency and outcome of every call over time under overload](docs/bench/overload.png)", "",
              "Reproduce: `python -m bench.overload --model-repo model_repo --out bench_out` (results in "
              "`bench_out/overload/results.json`)."]
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    asyncio.run(run(args))
    return 0  # unmet targets are findings, reported in the section, not a tool failure


if __name__ == "__main__":
    raise SystemExit(main())

"""python -m bench.soak --model-repo model_repo --out bench_out --minutes 30 [--swap-every-s 300]

Issue 8.5, soak: `--load-fraction` (70%) of the sustainable rate for `--minutes`, with a hot swap every
`--swap-every-s` (a new version, the same bytes renumbered, renamed into the repository): no request may
fail, and the server's RSS must not grow after warm-up by more than `--target-rss-growth` (5%).

Warm-up ends `--warmup-s` after the start, or, when swaps run, once the first swap has finished (plus a
margin): the first swap is when the process first holds two sessions, and what the allocator keeps of
that is a one-time step, not growth. Growth = median RSS over the last window / median RSS over the first
window after warm-up, both leaving out the samples taken during a swap (two sessions are loaded then);
the slope of a line fitted to those samples is reported too (MiB per hour).

A progress line every `--chunk-s` (load, failures, p50/p99, RSS, queue, serving version). Writes
bench_out/soak/{results.json, soak.png, section.md, server.log} and the `soak` section of BENCHMARKS.md.
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
from bench.kit.server import per_version, start_server
from bench.kit.swap import LifecycleLog, Swap, hot_swap, temp_repo
from bench.kit.timeline import Sample, Sampler, Segment, chunk_line, plot_timeline, run_segments
from loadtest.openloop import LoadResult

NAME = "soak"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--minutes", type=float, default=30.0, help="length of the load")
    ap.add_argument("--load-fraction", type=float, default=0.7, help="load as a fraction of the sustainable rate")
    ap.add_argument("--swap-every-s", type=float, default=300.0, help="a hot swap this often (0 = none)")
    ap.add_argument("--sample-every-s", type=float, default=5.0, help="RSS, CPU and /metrics sampling period")
    ap.add_argument("--chunk-s", type=float, default=30.0, help="a progress line this often")
    ap.add_argument("--warmup-s", type=float, default=60.0, help="warm-up when no swap runs (see above)")
    ap.add_argument("--poll-interval-s", type=float, default=1.0, help="server --poll-interval-s")
    ap.add_argument("--target-rss-growth", type=float, default=0.05)
    args = ap.parse_args(argv)
    if args.quick:
        args.minutes = min(args.minutes, 2.0)
        args.swap_every_s = min(args.swap_every_s, 30.0) if args.swap_every_s else 0.0
        args.sample_every_s, args.chunk_s, args.warmup_s = 2.0, 15.0, 15.0
    return args


def rss_growth(samples: Sequence[Sample], swaps: Sequence[Swap], end: float, args: argparse.Namespace
               ) -> dict[str, Any]:
    margin = min(30.0, args.swap_every_s / 3) if args.swap_every_s else 0.0
    done = [sw for sw in swaps if not sw.failed]
    warm_end = done[0].end_t + margin if done else args.warmup_s
    quiet = [s for s in samples if not any(sw.renamed_t - 1.0 <= s.t < sw.end_t + margin for sw in swaps)]
    after = [s for s in quiet if s.t >= warm_end] or [s for s in samples if s.t >= warm_end]
    if len(after) < 2:
        return {"warm_end_s": round(warm_end, 1), "growth": None, "note": "too few samples after warm-up"}
    w = min(60.0, max(10.0, (end - warm_end) / 4))
    first = [s.rss_mib for s in after if s.t < warm_end + w] or [after[0].rss_mib]
    last = [s.rss_mib for s in after if s.t >= end - w] or [after[-1].rss_mib]
    base, final = float(np.median(first)), float(np.median(last))
    ts = np.array([s.t for s in after])
    slope = float(np.polyfit(ts, [s.rss_mib for s in after], 1)[0]) * 3600 if np.ptp(ts) > 0 else None
    before_swaps = [s.rss_mib for s in samples if swaps and s.t < swaps[0].renamed_t]
    steps = []
    for sw in done:  # RSS just before each swap and once it is over: what each swap leaves behind
        pre = [s.rss_mib for s in samples if sw.renamed_t - 10.0 <= s.t < sw.renamed_t]
        post = [s.rss_mib for s in samples if sw.end_t + margin <= s.t < sw.end_t + margin + 10.0]
        if pre and post:
            steps.append({"version": sw.version, "before_mib": float(np.median(pre)),
                          "after_mib": float(np.median(post)),
                          "step_mib": round(float(np.median(post) - np.median(pre)), 1)})
    return {"warm_end_s": round(warm_end, 1), "window_s": round(w, 1), "baseline_mib": base, "final_mib": final,
            "growth": round(final / base - 1, 4), "slope_mib_per_hour": round(slope, 1) if slope is not None else None,
            "before_first_swap_mib": float(np.median(before_swaps)) if before_swaps else None,
            "peak_mib": max(s.rss_mib for s in samples), "per_swap": steps, "samples_used": len(after)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    log = logger(NAME)
    out = args.out / NAME
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "args": {k: str(v) if isinstance(v, Path) else v
                                                              for k, v in vars(args).items()}}
    duration = args.minutes * 60.0
    with temp_repo(args.model_repo, args.model, out) as (root, src):
        work = load_requests(src, args.data)
        log(f"data: {work.source}: {work.pairs} pairs; model {args.model}/{src.name}")
        flags = throughput_flags(args)
        server = await asyncio.to_thread(start_server, root, [*flags, "--poll-interval-s", str(args.poll_interval_s),
                                                              "--log-level", "INFO"], out / "server.log", log)
        try:
            rate = await obtain_rate(server, work.requests, args, flags, log)
            load = args.load_fraction * rate["rate"]
            log(f"soak: {load:.1f}/s ({args.load_fraction:.0%} of {rate['rate']:.1f}/s) for {args.minutes:g} min"
                + (f", a hot swap every {args.swap_every_s:g} s" if args.swap_every_s else ", no swaps"))
            before = await server.ascrape()
            t0 = time.perf_counter() + 0.5
            events = LifecycleLog(server.spec.log_path or out / "server.log", t0)
            events.poll()
            sampler = Sampler(server, t0, args.sample_every_s)
            sampler.start()
            swaps: list[Swap] = []

            def progress(seg: Segment, start: float, res: LoadResult) -> None:
                log(chunk_line(seg, start, res, sampler))

            async def swapper() -> None:
                version = int(src.name)
                k = 1
                while args.swap_every_s and k * args.swap_every_s < duration - 5.0:
                    await asyncio.sleep(max(t0 + k * args.swap_every_s - time.perf_counter(), 0.0))
                    sw = await hot_swap(root, args.model, src, version + 1, version, events, t0)
                    swaps.append(sw)
                    log(f"swap v{sw.version}: " + (f"FAILED: {sw.failed}" if sw.failed else
                                                   f"{sw.phases()['total_s']} s from rename to v{version} unloaded"))
                    if sw.failed:
                        return
                    version, k = version + 1, k + 1

            async with grpc.aio.insecure_channel(server.target) as channel:
                calls, _ = await asyncio.gather(
                    run_segments(channel, work.requests, [Segment("soak", load, duration)], t0=t0,
                                 chunk_s=args.chunk_s, timeout_s=args.timeout_s, seed=args.seed, on_chunk=progress),
                    swapper())
            samples = await sampler.stop()
            after = await server.ascrape()
        finally:
            await asyncio.to_thread(server.stop)
    pv_before, pv_after = per_version(before, "model_pv_total"), per_version(after, "model_pv_total")
    bin_s = max(5.0, round(duration / 120 / 5) * 5)
    series = calls.series(bin_s, duration)
    overall = calls.stats(0.0, duration + 1.0)
    results.update({
        "rate": rate, "load_rate": round(load, 2), "load_fraction": args.load_fraction, "data": work.source,
        "server_flags": flags, "duration_s": duration, "overall": overall,
        "swaps": [sw.to_json() for sw in swaps],
        "versions_seen": sorted(v for v, n in pv_after.items() if n - pv_before.get(v, 0.0) > 0),
        "rss": rss_growth(samples, swaps, duration, args),
        "p99_over_time": {"bin_s": bin_s, "t": series["t"], "p50_ms": series["p50_ms"], "p99_ms": series["p99_ms"],
                          "ok_per_s": series["ok"]},
        "chunks": calls.chunks, "samples": [vars(s) for s in samples],
    })
    png = plot_timeline(calls, samples, out / "soak.png",
                        f"Soak: {load:.0f} req/s Poisson for {args.minutes:g} min"
                        + (f", hot swap every {args.swap_every_s:g} s (green)" if args.swap_every_s else ""),
                        bin_s=bin_s, swaps=swaps, reference_rate=None)
    results["plot"] = str(png)
    write_results(out, results)
    md = markdown(results, args)
    print()
    print(md)
    publish_docs(args, NAME, md, [png], log)
    return results


def markdown(r: dict[str, Any], args: argparse.Namespace) -> str:
    o, rss = r["overall"], r["rss"]
    p99s = [x for x in r["p99_over_time"]["p99_ms"] if x == x]  # NaN: an empty bin
    ok_swaps = [s for s in r["swaps"] if not s["failed"]]
    growth = rss.get("growth")
    lines = [
        "## Soak (`python -m bench.soak`)",
        "",
        f"Issue 8.5: {args.load_fraction:.0%} of the sustainable rate for {args.minutes:g} minutes"
        + (f" with a hot swap every {args.swap_every_s:g} s" if args.swap_every_s else "")
        + ", on the real server (`python -m server`, " + " ".join(r["server_flags"])
        + f", `--poll-interval-s {args.poll_interval_s:g}`) under open-loop Poisson load (deadline "
        f"{args.timeout_s:g} s). RSS from /proc every {args.sample_every_s:g} s; growth is measured after warm-up "
        "(the end of the first swap, or the first minute without swaps), leaving out samples taken during swaps.",
        "",
        machine_line(r["machine"]),
        f"Load: {r['load_rate']:.1f} req/s = {r['load_fraction']:.0%} of the sustainable rate "
        f"{rate_sentence(r['rate'])}. Data: {r['data']}.",
        "",
        "| calls | failed | OK p50 ms | OK p99 ms | OK max ms | worst p99 per "
        f"{r['p99_over_time']['bin_s']:g} s ms | swaps completed | versions that answered |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| {o['calls']} | {o['failed']} | {num(o['ok_latency']['p50_ms'])} | {num(o['ok_latency']['p99_ms'])} "
        f"| {num(o['ok_latency']['max_ms'])} | {num(max(p99s) if p99s else None)} | "
        f"{len(ok_swaps)} of {len(r['swaps'])} | {', '.join(f'v{v}' for v in r['versions_seen'])} |",
        "",
        "| RSS | MiB |",
        "| --- | ---: |",
        f"| before the first swap | {_mib(rss.get('before_first_swap_mib'))} |",
        f"| baseline after warm-up (from {rss.get('warm_end_s', 0):.0f} s) | {_mib(rss.get('baseline_mib'))} |",
        f"| at the end | {_mib(rss.get('final_mib'))} |",
        f"| peak | {_mib(rss.get('peak_mib'))} |",
        f"| trend after warm-up (line fitted outside swaps) | {_trend(rss.get('slope_mib_per_hour'))} |",
    ]
    if rss.get("per_swap"):
        lines += ["", "RSS left behind by each swap (10 s before the rename vs 10 s after it is over): "
                  + ", ".join(f"v{s['version']} {s['step_mib']:+.0f} MiB" for s in rss["per_swap"]) + "."]
    failed = o["failed"]
    lines += [
        "",
        f"- Failed requests: **{failed}** (target 0: {verdict(failed == 0)})"
        + (f": {', '.join(f'{k} {v}' for k, v in o['failures'].items())}." if failed else "."),
        f"- RSS growth after warm-up: **{'–' if growth is None else f'{growth:+.1%}'}** (target < "
        f"{args.target_rss_growth:.0%}: {verdict(growth is not None and growth < args.target_rss_growth)}).",
        f"- Hot swaps: {len(ok_swaps)} of {len(r['swaps'])} completed"
        + ("" if len(ok_swaps) == len(r["swaps"]) else " (**a swap failed**, see results.json)") + ".",
        "",
        "![p99 latency and server RSS over the soak, swaps marked](docs/bench/soak.png)",
        "",
        f"Reproduce: `python -m bench.soak --model-repo model_repo --out bench_out --minutes {args.minutes:g}` "
        "(results in `bench_out/soak/results.json`).",
    ]
    return "\n".join(lines) + "\n"


def _trend(x: float | None) -> str:
    return "–" if x is None else f"{x:+,.0f} MiB/h"


def _mib(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    r = asyncio.run(run(args))
    return 0 if r["overall"]["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

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
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.kit.cli import add_common_args, new_parser
from bench.kit.fmt import pct, signed
from bench.kit.sustained import check, sustained
from bench.kit.swap import Swap
from bench.kit.timeline import Sample, Segment, median_rss
from bench.reports.soak import markdown

NAME = "soak"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = new_parser("soak", __doc__)
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
    steps = []
    for sw in done:  # RSS just before each swap and once it is over: what each swap leaves behind
        pre = median_rss([s for s in samples if sw.renamed_t - 10.0 <= s.t < sw.renamed_t])
        post = median_rss([s for s in samples if sw.end_t + margin <= s.t < sw.end_t + margin + 10.0])
        if pre is not None and post is not None:
            steps.append({"version": sw.version, "before_mib": pre, "after_mib": post,
                          "step_mib": round(post - pre, 1)})
    return {"warm_end_s": round(warm_end, 1), "window_s": round(w, 1), "baseline_mib": base, "final_mib": final,
            "growth": round(final / base - 1, 4), "slope_mib_per_hour": round(slope, 1) if slope is not None else None,
            "before_first_swap_mib": median_rss([s for s in samples if swaps and s.t < swaps[0].renamed_t]),
            "peak_mib": max(s.rss_mib for s in samples), "per_swap": steps, "samples_used": len(after)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    duration, every = args.minutes * 60.0, args.swap_every_s
    async with sustained(args, NAME, poll_interval_s=args.poll_interval_s, log_level="INFO") as run:
        load = args.load_fraction * run.rate["rate"]
        run.log(f"soak: {load:.1f}/s ({pct(args.load_fraction)} of {run.rate['rate']:.1f}/s) for {args.minutes:g} "
                "min" + (f", a hot swap every {every:g} s" if every else ", no swaps"))
        calls = await run.load([Segment("soak", load, duration)], chunk_s=args.chunk_s, sample_s=args.sample_every_s,
                               swap_at=np.arange(every, duration - 5.0, every).tolist() if every else [])
    bin_s = max(5.0, round(duration / 120 / 5) * 5)
    series, overall = calls.series(bin_s, duration), calls.stats(0.0, duration + 1.0)
    r = {"load_rate": round(load, 2), "load_fraction": args.load_fraction, "duration_s": duration, "overall": overall,
         "versions_seen": sorted(run.answered), "rss": rss_growth(run.samples, run.swaps, duration, args),
         "p99_over_time": {"bin_s": bin_s, "t": series["t"], "p50_ms": series["p50_ms"], "p99_ms": series["p99_ms"],
                           "ok_per_s": series["ok"]}, "chunks": calls.chunks}
    growth, done = r["rss"]["growth"], sum(1 for sw in run.swaps if not sw.failed)
    r["checks"] = [check("failed requests", ", ".join(f"{k} {v}" for k, v in overall["failures"].items()) or "0", "0",
                         overall["failed"] == 0),
                   check("RSS growth after warm-up", signed(growth and 100 * growth, 1, "%"), f"< "
                         f"{pct(args.target_rss_growth)}", None if growth is None else growth < args.target_rss_growth),
                   check("hot swaps completed", f"{done} of {len(run.swaps)}", "all", done == len(run.swaps))]
    return run.publish(calls, r, markdown, f"Soak: {load:.0f} req/s Poisson for {args.minutes:g} min"
                       + (f", hot swap every {every:g} s (green)" if every else ""), bin_s=bin_s)


def main(argv: Sequence[str] | None = None) -> int:
    r = asyncio.run(run(parse_args(argv)))
    return 0 if r["overall"]["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

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
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.kit.cli import add_common_args, new_parser
from bench.kit.fmt import num, pct, ratio
from bench.kit.sustained import check, sustained
from bench.kit.timeline import REFUSED, Sample, Segment, median_rss
from bench.reports.overload import markdown

NAME = "overload"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = new_parser("overload", __doc__)
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


def sampled(samples: Sequence[Sample]) -> dict[str, Any]:
    """Over some samples: RSS (median, max, MiB), queue depth (max, mean) and CPU (mean cores: server, others)."""
    depths = [x.queue_depth for x in samples if x.queue_depth is not None]
    return {"queue_depth": {"max": max(depths), "mean": round(float(np.mean(depths)), 1), "samples": len(depths)}
            if depths else None,
            "rss_mib": {"median": median_rss(samples), "max": max(x.rss_mib for x in samples)} if samples else None,
            "server_cores": round(float(np.mean([x.server_cores for x in samples])), 2) if samples else None,
            "foreign_cores": round(float(np.mean([x.foreign_cores for x in samples])), 2) if samples else None}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with sustained(args, NAME) as run:
        s = run.rate["rate"]
        normal, over = args.normal_fraction * s, args.overload_factor * s
        segments = [Segment("normal", normal, args.normal_s), Segment("overload", over, args.overload_s),
                    Segment("recovery", normal, args.recovery_s)]
        run.log(f"phases: normal {normal:.1f}/s for {args.normal_s:.0f} s, overload {over:.1f}/s for "
                f"{args.overload_s:.0f} s, recovery {normal:.1f}/s for {args.recovery_s:.0f} s")
        calls = await run.load(segments)
    bounds = {"normal": (0.0, args.normal_s), "overload": (args.normal_s, args.normal_s + args.overload_s),
              "recovery": (args.normal_s + args.overload_s, args.normal_s + args.overload_s + args.recovery_s)}
    phases = {name: {**calls.stats(lo + args.settle_s, hi), **sampled(
        [x for x in run.samples if lo <= x.t < hi + (1.5 if name == "recovery" else 0.0)])}
        for name, (lo, hi) in bounds.items()}
    r = {"sustainable_rate": s, "normal_rate": round(normal, 2), "overload_rate": round(over, 2),
         "queue_limit": queue_limit(args.server_args), "phases": phases, "server_alive_at_end": run.alive,
         "chunks": calls.chunks}
    return run.publish(calls, {**r, "checks": checks(r, args)}, markdown,
                       f"Overload: {over:.0f} req/s offered ({args.overload_factor:g}× the sustainable {s:.0f}/s), "
                       f"normal {normal:.0f}/s before and after", bin_s=1.0, reference_rate=s,
                       phases=[(n, lo, hi) for n, (lo, hi) in bounds.items()])


def checks(r: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    nrm, ovl, rec = (r["phases"][k] for k in ("normal", "overload", "recovery"))
    qd, rl, s = ovl["queue_depth"], ovl["refused_latency"], r["sustainable_rate"]
    other, refused = {k: v for k, v in ovl["failures"].items() if k != REFUSED}, ovl["failures"].get(REFUSED, 0)
    p99n, p99o, p99r = (p["ok_latency"]["p99_ms"] for p in (nrm, ovl, rec))
    p99_ratio = p99o / p99n if p99n and p99o else None
    tp = ovl["ok_rate"] or 0.0
    rss_n, rss_o, rss_r = (p["rss_mib"][k] if p["rss_mib"] else None
                           for p, k in ((nrm, "median"), (ovl, "max"), (rec, "median")))
    return [
        check("queue stays bounded (max depth under overload, /metrics every 0.5 s)",
              f"{qd['max']:.0f} items (mean {qd['mean']:.0f})" if qd else "not scraped",
              f"≤ {r['queue_limit']} (--max-queue-size)", qd["max"] <= r["queue_limit"] if qd else None),
        check("the excess is refused with RESOURCE_EXHAUSTED (other failures under overload)",
              f"{refused} refused ({pct(refused / max(ovl['calls'], 1))} of calls); other: "
              + (", ".join(f"{k} {v}" for k, v in other.items()) or "none"), "no other failure", not other),
        check("refusals come back fast (p50 / p99 / max of refused calls)",
              f"{num(rl['p50_ms'])} / {num(rl['p99_ms'])} / {num(rl['max_ms'])} ms",
              f"p99 ≤ {args.target_refusal_p99_ms:g} ms",
              rl["p99_ms"] <= args.target_refusal_p99_ms if rl["p99_ms"] is not None else None),
        check("p99 of admitted (OK) calls under overload vs normal load",
              f"{num(p99o)} vs {num(p99n)} ms = {ratio(p99_ratio)}", f"≤ {args.target_p99_ratio:g}×",
              p99_ratio <= args.target_p99_ratio if p99_ratio else None),
        check("admitted throughput under overload (OK/s) vs the sustainable rate",
              f"{num(tp)} vs {num(s)}/s = {ratio(tp / s)}", f"≥ {args.target_throughput:g}× (no collapse)",
              tp >= args.target_throughput * s),
        check("server RSS: normal (median) / overload (max) / recovery (median)",
              f"{num(rss_n, 0)} / {num(rss_o, 0)} / {num(rss_r, 0)} MiB", f"flat: ≤ +{pct(args.target_rss_growth)}",
              None if rss_n is None or rss_o is None or rss_r is None
              else max(rss_o, rss_r) <= rss_n * (1 + args.target_rss_growth)),
        check("recovery: failures and p99 back at normal load", f"{rec['failed']} failed, p99 {num(p99r)} ms",
              f"0 failed, p99 ≤ {args.target_p99_ratio:g}× normal", rec["failed"] == 0 and p99r is not None
              and p99n is not None and p99r <= args.target_p99_ratio * p99n),
        check("server still running at the end", "yes" if r["server_alive_at_end"] else "no", "yes",
              r["server_alive_at_end"])]


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(run(parse_args(argv)))
    return 0  # unmet targets are findings, reported in the section, not a tool failure


if __name__ == "__main__":
    raise SystemExit(main())

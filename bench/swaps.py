"""python -m bench.swaps --model-repo model_repo --out bench_out [--quick]

Issue 5, "loading must not stall serving": p99 latency while new versions are loaded, warmed, switched to
and the old ones unloaded, against steady state, on the same server under the same open-loop load.

1. The real server (`python -m server`, fp32, result cache off, `--poll-interval-s 0.5`) serves a throw-away
   repository holding the newest version of the model (hard links).
2. The sustainable rate S is obtained (`bench.kit.rates`); Poisson load at `--load-fraction` × S starts.
3. Steady window: `--steady-s` seconds (after a warm-up) with nothing changing.
4. Then `--swaps` times, every `--swap-every-s`: version N+1 (the same bytes, renumbered) is staged under a
   hidden name and renamed into place. The server's log times each swap: detected, loaded + checksums +
   warm-up + golden check, serving, previous version drained and unloaded. A swap window runs from the
   rename to the unload plus `--window-tail-s`; its calls are pooled into "during swaps".

Writes bench_out/swaps/{results.json, swaps.png, section.md, server.log} and the `swaps` section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.kit.cli import add_common_args, new_parser
from bench.kit.fmt import pct, ratio
from bench.kit.sustained import check, sustained
from bench.kit.timeline import OK, Segment, median_rss
from bench.reports.swaps import markdown
from loadtest.openloop import latency_summary

NAME = "swaps"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = new_parser("swaps", __doc__)
    add_common_args(ap)
    ap.add_argument("--load-fraction", type=float, default=0.55, help="offered load as a fraction of the "
                    "sustainable rate")
    ap.add_argument("--warmup-s", type=float, default=5.0, help="load before the steady window starts")
    ap.add_argument("--steady-s", type=float, default=45.0, help="steady window (no swap)")
    ap.add_argument("--swaps", type=int, default=4)
    ap.add_argument("--swap-every-s", type=float, default=25.0, help="seconds between swap starts (at least: "
                    "a swap starts only after the previous one finished)")
    ap.add_argument("--window-tail-s", type=float, default=1.0, help="a swap window ends this long after the "
                    "old version is unloaded (calls queued behind the swap are still slow)")
    ap.add_argument("--poll-interval-s", type=float, default=0.5, help="server --poll-interval-s")
    ap.add_argument("--target-ratio", type=float, default=2.0, help="p99 during swaps / steady p99 must stay "
                    "at or below this")
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup_s, args.steady_s, args.swaps, args.swap_every_s = 3.0, 15.0, 2, 15.0
    return args


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with sustained(args, NAME, poll_interval_s=args.poll_interval_s, log_level="INFO") as run:
        load, start = args.load_fraction * run.rate["rate"], args.warmup_s + args.steady_s
        run.log(f"load: {load:.1f}/s ({pct(args.load_fraction)} of {run.rate['rate']:.1f}/s): {args.steady_s:.0f} s "
                f"steady, then {args.swaps} swaps every {args.swap_every_s:.0f} s")
        calls = await run.load([Segment("warm-up", load, args.warmup_s), Segment("steady", load, args.steady_s),
                                Segment("swaps", load, args.swaps * args.swap_every_s)],
                               swap_at=[start + i * args.swap_every_s for i in range(args.swaps)],
                               hold_s=args.window_tail_s + 2.0)
    windows = [(sw.renamed_t, sw.end_t + args.window_tail_s) for sw in run.swaps]
    in_swap = np.logical_or.reduce([calls.mask(lo, hi) for lo, hi in windows] + [np.zeros(calls.t.size, bool)])
    ok, between = calls.code == OK, (calls.t >= start) & ~in_swap
    steady, during = calls.stats(args.warmup_s, start), latency_summary(calls.latency[in_swap & ok])
    p99s = (during["p99_ms"], steady["ok_latency"]["p99_ms"])
    r = {"load_rate": round(load, 2), "load_fraction": args.load_fraction, "steady": steady,
         "during_swaps": {"calls": int(in_swap.sum()), "failed": int((in_swap & ~ok).sum()), "ok_latency": during},
         "between_swaps": {"calls": int(between.sum()), "ok_latency": latency_summary(calls.latency[between & ok])},
         "per_swap": [{**st, "failed_calls": st["failed"], **sw.to_json(), "window": [round(lo, 2), round(hi, 2)]}
                      for sw, (lo, hi) in zip(run.swaps, windows, strict=True) for st in [calls.stats(lo, hi)]],
         "all": calls.stats(), "p99_ratio": p99s[0] / p99s[1] if p99s[0] and p99s[1] else None,
         "versions_seen": sorted(run.answered), "items_per_version": {str(v): n for v, n in run.answered.items()},
         "model_loads": {k.split('outcome="')[1].rstrip('"}'): v for k, v in run.after.items()
                         if k.startswith("scoring_model_loads_total{")},
         "rss_mib": {"steady_median": median_rss([x for x in run.samples if args.warmup_s <= x.t < start]),
                     "peak_during_swaps": max((x.rss_mib for x in run.samples if any(
                         sw.renamed_t <= x.t < sw.end_t for sw in run.swaps)), default=None),
                     "end_median": median_rss(run.samples[-6:])}}
    return run.publish(calls, {**r, "checks": checks(r, args, int(run.src.name))}, markdown,
                       f"Hot swaps under {load:.0f} req/s Poisson ({pct(args.load_fraction)} of sustainable). Green: "
                       "rename → old version unloaded; line: new version serves", bin_s=2.0,
                       phases=[("steady", args.warmup_s, start)])


def checks(r: dict[str, Any], args: argparse.Namespace, first: int) -> list[dict[str, Any]]:
    st, du, failed = r["steady"], r["during_swaps"], r["all"]["failed"]
    n_ok = sum(1 for s in r["per_swap"] if not s["failed"])
    # Latency is of OK calls: a window with failed calls hides its worst cases, so it cannot pass.
    return [check("p99 during swaps / steady p99, with no failed call in either window",
                  f"{ratio(r['p99_ratio'])} ({st['failed']} failed steady, {du['failed']} during swaps)",
                  f"≤ {args.target_ratio:g}×", r["p99_ratio"] is not None and r["p99_ratio"] <= args.target_ratio
                  and st["failed"] == du["failed"] == 0),
            check("failed calls over the whole run", ", ".join(f"{k} {v}" for k, v in r["all"]["failures"].items())
                  or "0", "0", failed == 0),
            check("swaps completed; versions that answered (server's `model_pv_total`)",
                  f"{n_ok} of {args.swaps}; " + ", ".join(f"v{v}" for v in r["versions_seen"]), "all; each version",
                  n_ok == args.swaps and r["versions_seen"] == list(range(first, first + n_ok + 1)))]


def main(argv: Sequence[str] | None = None) -> int:
    r = asyncio.run(run(parse_args(argv)))
    return 0 if r["all"]["failed"] == 0 and all(not s["failed"] for s in r["swaps"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

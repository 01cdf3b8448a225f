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
import math
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
from bench.kit.timeline import Calls, Sampler, Segment, chunk_line, plot_timeline, run_segments
from loadtest.openloop import LoadResult, latency_summary

NAME = "swaps"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.swaps", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
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


def summarize(calls: Calls, swaps: list[Swap], args: argparse.Namespace, load_end: float) -> dict[str, Any]:
    steady = calls.stats(args.warmup_s, args.warmup_s + args.steady_s)
    windows = [(sw.renamed_t, sw.end_t + args.window_tail_s) for sw in swaps]
    in_swap = np.zeros(calls.t.size, bool)
    for lo, hi in windows:
        in_swap |= calls.mask(lo, hi)
    ok = calls.code == "OK"
    during = latency_summary(calls.latency[in_swap & ok])
    after_steady = calls.t >= args.warmup_s + args.steady_s
    between = latency_summary(calls.latency[after_steady & ~in_swap & ok])
    per_swap = []
    for sw, (lo, hi) in zip(swaps, windows, strict=True):
        st = calls.stats(lo, hi)
        per_swap.append({**sw.to_json(), "window": [round(lo, 2), round(hi, 2)], "calls": st["calls"],
                         "failed_calls": st["failed"], "failures": st["failures"], "ok_latency": st["ok_latency"]})
    all_stats = calls.stats(0.0, load_end)
    ratio = (during["p99_ms"] / steady["ok_latency"]["p99_ms"]
             if during["p99_ms"] and steady["ok_latency"]["p99_ms"] else None)
    return {
        "steady": steady,
        "during_swaps": {"calls": int(in_swap.sum()), "failed": int((in_swap & ~ok).sum()), "ok_latency": during},
        "between_swaps": {"calls": int((after_steady & ~in_swap).sum()), "ok_latency": between},
        "per_swap": per_swap,
        "all": all_stats,
        "p99_ratio": round(ratio, 3) if ratio is not None else None,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    log = logger(NAME)
    out = args.out / NAME
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "args": {k: str(v) if isinstance(v, Path) else v
                                                              for k, v in vars(args).items()}}
    with temp_repo(args.model_repo, args.model, out) as (root, src):
        work = load_requests(src, args.data)
        log(f"data: {work.source}: {work.pairs} pairs; model {args.model}/{src.name} (hard-linked into {root})")
        flags = throughput_flags(args)
        server = await asyncio.to_thread(start_server, root, [*flags, "--poll-interval-s", str(args.poll_interval_s),
                                                              "--log-level", "INFO"], out / "server.log", log)
        try:
            rate = await obtain_rate(server, work.requests, args, flags, log)
            load = args.load_fraction * rate["rate"]
            total = args.warmup_s + args.steady_s + args.swaps * args.swap_every_s
            log(f"load: {load:.1f}/s ({args.load_fraction:.0%} of {rate['rate']:.1f}/s) for {total:.0f} s: "
                f"{args.steady_s:.0f} s steady, then {args.swaps} swaps every {args.swap_every_s:.0f} s")
            before = await server.ascrape()
            t0 = time.perf_counter() + 0.5
            events = LifecycleLog(server.spec.log_path or out / "server.log", t0)
            events.poll()  # skip the start-up events
            sampler = Sampler(server, t0, 0.5)
            sampler.start()
            swaps: list[Swap] = []

            def progress(seg: Segment, start: float, res: LoadResult) -> None:
                log(chunk_line(seg, start, res, sampler))

            stop = asyncio.Event()

            async def swapper() -> None:
                try:
                    await swap_all()
                    # The load goes on until the last swap window (and the planned time) is over.
                    end = max(total, swaps[-1].end_t + args.window_tail_s + 2.0 if swaps else 0.0)
                    await asyncio.sleep(max(t0 + end - time.perf_counter(), 0.0))
                finally:
                    stop.set()

            async def swap_all() -> None:
                version = int(src.name)
                for i in range(args.swaps):
                    slot = t0 + args.warmup_s + args.steady_s + i * args.swap_every_s
                    await asyncio.sleep(max(slot - time.perf_counter(), 0.0))
                    sw = await hot_swap(root, args.model, src, version + 1, version, events, t0)
                    swaps.append(sw)
                    p = sw.phases()
                    log(f"swap v{sw.version}: " + (f"FAILED: {sw.failed}" if sw.failed else
                        f"detected {p['detect_s']} s, load+verify+warm+golden {p['load_verify_warm_golden_s']} s, "
                        f"switch {p['switch_s']} s, drain+unload {p['drain_unload_s']} s (total {p['total_s']} s)"))
                    if sw.failed:
                        return
                    version += 1

            async with grpc.aio.insecure_channel(server.target) as channel:
                segments = [Segment("warm-up", load, args.warmup_s), Segment("steady", load, args.steady_s),
                             Segment("swaps", load, args.swaps * (args.swap_every_s + 60.0) + 60.0)]
                calls, _ = await asyncio.gather(
                    run_segments(channel, work.requests, segments, t0=t0, chunk_s=5.0, timeout_s=args.timeout_s,
                                 seed=args.seed, on_chunk=progress, stop=stop),
                    swapper())
            samples = await sampler.stop()
            after = await server.ascrape()
        finally:
            await asyncio.to_thread(server.stop)
    pv_before, pv_after = per_version(before, "model_pv_total"), per_version(after, "model_pv_total")
    versions_seen = sorted(v for v, n in pv_after.items() if n - pv_before.get(v, 0.0) > 0)
    loads = {k.split('outcome="')[1].rstrip('"}'): v for k, v in after.items()
             if k.startswith("scoring_model_loads_total{")}
    load_end = float(calls.t.max()) if calls.t.size else total
    summary = summarize(calls, swaps, args, load_end + 1e-3)
    steady_rss = [s.rss_mib for s in sampler.between(args.warmup_s, args.warmup_s + args.steady_s)]
    swap_rss = [s.rss_mib for s in samples if any(sw.renamed_t <= s.t < sw.end_t for sw in swaps)]
    end_rss = [s.rss_mib for s in samples[-6:]]
    results.update({
        "rate": rate, "load_rate": round(load, 2), "load_fraction": args.load_fraction, "data": work.source,
        "server_flags": flags, "poll_interval_s": args.poll_interval_s, "swaps": [sw.to_json() for sw in swaps],
        **summary,
        "versions_seen": versions_seen,
        "items_per_version": {str(v): pv_after[v] - pv_before.get(v, 0.0) for v in versions_seen},
        "model_loads": loads,
        "rss_mib": {"steady_median": float(np.median(steady_rss)) if steady_rss else None,
                    "peak_during_swaps": max(swap_rss, default=None),
                    "end_median": float(np.median(end_rss)) if end_rss else None},
        "samples": [vars(s) for s in samples],
    })
    png = plot_timeline(calls, samples, out / "swaps.png", f"Hot swaps under {load:.0f} req/s Poisson "
                        f"({args.load_fraction:.0%} of sustainable). Green: rename → old version unloaded; "
                        "line: new version serves", bin_s=2.0, swaps=swaps,
                        phases=[("steady", args.warmup_s, args.warmup_s + args.steady_s)],
                        reference_rate=None)
    results["plot"] = str(png)
    write_results(out, results)
    md = markdown(results, args)
    print()
    print(md)
    publish_docs(args, NAME, md, [png], log)
    return results


def markdown(r: dict[str, Any], args: argparse.Namespace) -> str:
    st, du, bw = r["steady"], r["during_swaps"], r["between_swaps"]
    ratio = r["p99_ratio"]
    failed = r["all"]["failed"]
    n_ok = sum(1 for s in r["swaps"] if not s["failed"])
    expected = set(range(int(r["versions_seen"][0]) if r["versions_seen"] else 1, n_ok + 2))
    rss = r["rss_mib"]
    lines = [
        "## Hot swaps under load (`python -m bench.swaps`)",
        "",
        "Issue 5: loading a version must not stall serving. The real server (`python -m server`, "
        f"{' '.join(r['server_flags'])}, `--poll-interval-s {r['poll_interval_s']:g}`) serves a throw-away copy of the "
        "repository (hard links) under open-loop Poisson load (`loadtest.openloop`, latency from the scheduled "
        f"send, deadline {args.timeout_s:g} s). After a {args.steady_s:.0f} s steady window, a new version (the "
        "same bytes, renumbered) is staged under a hidden name and renamed into place, "
        f"{len(r['swaps'])} times. Each swap window runs from the rename until the old version is unloaded "
        f"(+{args.window_tail_s:g} s): detection by the poller, checksums, session, warm-up and golden check, the "
        "switch, the drain. Phase times come from the server's own log.",
        "",
        machine_line(r["machine"]),
        f"Load: {r['load_rate']:.1f} req/s = {r['load_fraction']:.0%} of the sustainable rate "
        f"{rate_sentence(r['rate'])}. Data: {r['data']}.",
        "",
        "| window | calls | failed | p50 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| steady ({st['from_s']:.0f}–{st['to_s']:.0f} s) | {st['calls']} | {st['failed']} | "
        f"{num(st['ok_latency']['p50_ms'])} | {num(st['ok_latency']['p99_ms'])} | "
        f"{num(st['ok_latency']['max_ms'])} |",
        f"| during swaps (pooled, {len(r['per_swap'])} windows) | {du['calls']} | {du['failed']} | "
        f"{num(du['ok_latency']['p50_ms'])} | {num(du['ok_latency']['p99_ms'])} | "
        f"{num(du['ok_latency']['max_ms'])} |",
        f"| between swaps | {bw['calls']} | – | {num(bw['ok_latency']['p50_ms'])} | "
        f"{num(bw['ok_latency']['p99_ms'])} | {num(bw['ok_latency']['max_ms'])} |",
        "",
        "| swap | detected s | load + verify + warm-up + golden s | switch s | drain + unload s | total s | "
        "calls in window | failed | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in r["per_swap"]:
        lines.append(f"| v{s['previous']} → v{s['version']}{' FAILED: ' + s['failed'] if s['failed'] else ''} | "
                     f"{_s(s['detect_s'])} | {_s(s['load_verify_warm_golden_s'])} | {_s(s['switch_s'])} | "
                     f"{_s(s['drain_unload_s'])} | {_s(s['total_s'])} | {s['calls']} | {s['failed_calls']} | "
                     f"{num(s['ok_latency']['p99_ms'])} | {num(s['ok_latency']['max_ms'])} |")
    # Latency is of OK calls; a window with refused calls hides its worst cases, so it cannot pass.
    clean = st["failed"] == 0 and du["failed"] == 0
    ratio_ok = ratio is not None and ratio <= args.target_ratio and clean
    lines += [
        "",
        f"- **p99 during swaps / steady p99 = {_x(ratio)}** (target ≤ {args.target_ratio:g}×, with no failed call "
        f"in either window: {verdict(ratio_ok)})"
        + ("." if clean else f"; latency is of OK calls only, and {st['failed']} (steady) and {du['failed']} "
           "(swaps) calls failed, so the ratio compares what the server admitted, not what clients saw."),
        f"- Failed calls over the whole run: **{failed}** (target 0: {verdict(failed == 0)})"
        + (f": {', '.join(f'{k} {v}' for k, v in r['all']['failures'].items())}." if failed else "."),
        f"- Versions that answered (server's `model_pv_total`): {', '.join(f'v{v}' for v in r['versions_seen'])}; "
        f"{n_ok} of {len(r['swaps'])} swaps completed"
        + ("" if set(r["versions_seen"]) == expected else " (**not every version answered**)")
        + f"; version loads by outcome: {r['model_loads']}.",
        f"- Server RSS: {_mib(rss['steady_median'])} steady, peak {_mib(rss['peak_during_swaps'])} during swaps, "
        f"{_mib(rss['end_median'])} at the end (`python -m bench.soak` follows it over many swaps).",
        "",
        "![Latency over time with hot swaps marked](docs/bench/swaps.png)",
        "",
        "Reproduce: `python -m bench.swaps --model-repo model_repo --out bench_out` (results in "
        "`bench_out/swaps/results.json`, the server's log next to it).",
    ]
    return "\n".join(lines) + "\n"


def _s(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _x(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.2f}×"


def _mib(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f} MiB"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    return 0 if results["all"]["failed"] == 0 and all(not s["failed"] for s in results["swaps"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

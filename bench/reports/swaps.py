"""`python -m bench.swaps`'s report: latency in the steady window, during and between swaps, each swap's phases
(from the server's log) and its window, the targets, the versions and the memory."""

from __future__ import annotations

from typing import Any

from bench.kit.fmt import DASH, mib, num, pct, table
from bench.kit.sustained import section, targets


def markdown(r: dict[str, Any]) -> str:
    a, st, du, bw, rss = r["args"], r["steady"], r["during_swaps"], r["between_swaps"], r["rss_mib"]

    def lat(x: dict[str, Any]) -> list[str]:
        return [num(x["ok_latency"][k]) for k in ("p50_ms", "p99_ms", "max_ms")]

    windows = [[f"steady ({st['from_s']:.0f}–{st['to_s']:.0f} s)", str(st["calls"]), str(st["failed"]), *lat(st)],
               [f"during swaps (pooled, {len(r['per_swap'])} windows)", str(du["calls"]), str(du["failed"]), *lat(du)],
               ["between swaps", str(bw["calls"]), DASH, *lat(bw)]]
    swaps = [[f"v{s['previous']} → v{s['version']}" + (f" FAILED: {s['failed']}" if s["failed"] else ""),
              *(num(s[k], 2) for k in ("detect_s", "load_verify_warm_golden_s", "switch_s", "drain_unload_s",
                                       "total_s")),
              str(s["calls"]), str(s["failed_calls"]), *lat(s)[1:]] for s in r["per_swap"]]
    return section(r, "swaps", "Hot swaps under load", (
        f"Issue 5: loading a version must not stall serving. Load: {num(r['load_rate'])} req/s = "
        f"{pct(r['load_fraction'])} of the sustainable rate, on a throw-away copy of the repository (hard links). "
        f"After a {a['steady_s']:.0f} s steady window, a new version (the same bytes, renumbered) is staged under a "
        f"hidden name and renamed into place, {len(r['swaps'])} times. Each swap window runs from the rename until the "
        f"old version is unloaded (+{a['window_tail_s']:g} s): detection by the poller, checksums, session, warm-up "
        "and golden check, the switch, the drain. Phase times come from the server's own log."), [
        *table(["window", "calls", "failed", "p50 ms", "p99 ms", "max ms"], windows), "",
        *table(["swap", "detected s", "load + verify + warm-up + golden s", "switch s", "drain + unload s", "total s",
                "calls in window", "failed", "p99 ms", "max ms"], swaps), "", *targets(r["checks"]), "",
        f"Version loads by outcome: {r['model_loads']}. Server RSS: {mib(rss['steady_median'])} steady, peak "
        f"{mib(rss['peak_during_swaps'])} during swaps, {mib(rss['end_median'])} at the end (`python -m bench.soak` "
        "follows it over many swaps)."], "Latency over time with hot swaps marked")

"""`python -m bench.overload`'s report: each phase's calls, latency, queue, memory and CPU, and the targets."""

from __future__ import annotations

from typing import Any

from bench.kit.fmt import num, pct, table
from bench.kit.sustained import section, targets
from bench.kit.timeline import REFUSED


def markdown(r: dict[str, Any]) -> str:
    a = r["args"]
    rows = [[name, num(ph["offered_rate"]), num(ph["ok_rate"]), str(ph["failures"].get(REFUSED, 0)),
             ", ".join(f"{k} {v}" for k, v in ph["failures"].items() if k != REFUSED) or "0",
             *(num(ph[lat][p]) for lat in ("ok_latency", "refused_latency") for p in ("p50_ms", "p99_ms")),
             num(ph["queue_depth"] and ph["queue_depth"]["max"], 0), num(ph["rss_mib"] and ph["rss_mib"]["median"], 0),
             num(ph["server_cores"], 2), num(ph["foreign_cores"], 2)] for name, ph in r["phases"].items()]
    return section(r, "overload", "Overload", (
        f"Issue 8.2: offered {a['overload_factor']:g}× the sustainable rate, the server must refuse the excess fast "
        "(RESOURCE_EXHAUSTED), keep its queue bounded, keep the latency of what it admits near its normal value, keep "
        f"its memory flat and keep its throughput. Normal {num(r['normal_rate'])}/s ({pct(a['normal_fraction'])} of "
        f"the sustainable rate) for {a['normal_s']:.0f} s, overload {num(r['overload_rate'])}/s for "
        f"{a['overload_s']:.0f} s, normal again for {a['recovery_s']:.0f} s. Each phase's numbers leave out its first "
        f"{a['settle_s']:g} s."), [
        *table(["phase", "offered/s", "OK/s", "refused (RESOURCE_EXHAUSTED)", "other failures", "OK p50 ms",
                "OK p99 ms", "refused p50 ms", "refused p99 ms", "max queue depth", "RSS MiB (median)",
                "server CPU (cores)", "foreign CPU (cores)"], rows, "lrrrlrrrrrrrr"), "", *targets(r["checks"])],
        "Latency and outcome of every call over time under overload")

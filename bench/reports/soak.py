"""`python -m bench.soak`'s report: calls and latency over the whole soak, the server's memory after warm-up and
around each swap, and the targets."""

from __future__ import annotations

import math
from typing import Any

from bench.kit.fmt import mib, num, pct, signed, table
from bench.kit.sustained import section, targets


def markdown(r: dict[str, Any]) -> str:
    a, o, rss, lat = r["args"], r["overall"], r["rss"], r["overall"]["ok_latency"]
    p99s = [x for x in r["p99_over_time"]["p99_ms"] if not math.isnan(x)]  # NaN: an empty bin
    done = sum(1 for s in r["swaps"] if not s["failed"])
    return section(r, "soak", "Soak", (
        f"Issue 8.5: {num(r['load_rate'])} req/s = {pct(r['load_fraction'])} of the sustainable rate for "
        f"{a['minutes']:g} minutes" + (f" with a hot swap every {a['swap_every_s']:g} s" if a["swap_every_s"] else "")
        + ". RSS growth is measured after warm-up (the end of the first swap, or the first minute without swaps), "
        "leaving out samples taken during swaps."), [
        *table(["calls", "failed", "OK p50 ms", "OK p99 ms", "OK max ms",
                f"worst p99 per {r['p99_over_time']['bin_s']:g} s ms", "swaps completed", "versions that answered"],
               [[str(o["calls"]), str(o["failed"]), num(lat["p50_ms"]), num(lat["p99_ms"]), num(lat["max_ms"]),
                 num(max(p99s, default=None)), f"{done} of {len(r['swaps'])}",
                 ", ".join(f"v{v}" for v in r["versions_seen"])]], "rrrrrrrl"), "",
        *table(["RSS", "MiB"], [["before the first swap", mib(rss.get("before_first_swap_mib"), False)],
                                [f"baseline after warm-up (from {rss['warm_end_s']:.0f} s)",
                                 mib(rss.get("baseline_mib"), False)],
                                ["at the end", mib(rss.get("final_mib"), False)],
                                ["peak", mib(rss.get("peak_mib"), False)],
                                ["trend after warm-up (line fitted outside swaps)",
                                 signed(rss.get("slope_mib_per_hour"), 0, " MiB/h")]]), "",
        *(["RSS left behind by each swap (10 s before the rename vs 10 s after it is over): " + ", ".join(
            f"v{s['version']} {signed(s['step_mib'], 0, ' MiB')}" for s in rss["per_swap"]) + ".", ""]
          if rss.get("per_swap") else []), *targets(r["checks"])],
        "p99 latency and server RSS over the soak, swaps marked", f" --minutes {a['minutes']:g}")

"""`python -m bench.paths`'s report: the highest sustainable rate of each request path against the raw engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.kit.fmt import num, pct, ratio, table, verdict
from bench.kit.machine import machine_line

# Issue 20's goals: sustained rate / the engine limit of the same inputs (queries: the uncached limit).
GOALS = {("pairs", "unary"): 0.85, ("pairs", "stream"): 0.92, ("queries", "unary"): 1.6, ("queries", "stream"): 2.0}
CASES = {"pairs": "real pairs, cache off", "queries": "query-only log, cache on"}
METHODS = {"unary": "unary Score", "stream": "ScoreStream"}


def plot(r: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0))
    for ax, case in zip(axes, CASES, strict=True):
        limit = r["engine"][case]["limit"]
        top = limit
        for kind, color in (("unary", "tab:blue"), ("stream", "tab:green")):
            steps = r[case][kind]["steps"]
            top = max(top, *(s["offered_rate"] for s in steps))
            ax.plot([s["offered_rate"] for s in steps], [s["achieved_rate"] for s in steps], "o-", color=color,
                    label=METHODS[kind])
            bad = [s for s in steps if not s["sustainable"]]
            ax.plot([s["offered_rate"] for s in bad], [s["achieved_rate"] for s in bad], "x", color="black", ms=7)
        ax.plot([0, top * 1.05], [0, top * 1.05], ":", color="grey", label="achieved = offered")
        ax.axhline(limit, color="black", lw=1, ls="--", label=f"raw engine ({limit:.0f}/s)")
        for kind, ls in (("unary", "-."), ("stream", "--")):
            goal = GOALS[(case, kind)] * limit
            ax.axhline(goal, color="tab:red", lw=0.8, ls=ls, label=f"goal {METHODS[kind]} ({goal:.0f}/s)")
        ax.set(xlabel="offered (requests / s, Poisson)", ylabel="achieved (OK / s)", title=CASES[case] + " (x = not "
               "sustainable)")
        ax.title.set_fontsize(10)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def markdown(r: dict[str, Any]) -> str:
    a, q = r["args"], r["query_log"]
    rows = []
    for case, name in CASES.items():
        limit = r["engine"][case]["limit"]
        for kind, label in METHODS.items():
            out = r[case][kind]
            got = out["max_sustained_ratio"]
            goal = GOALS[(case, kind)]
            best = max((s for s in out["steps"] if s["sustainable"]), key=lambda s: s["achieved_rate"], default=None)
            hits = best["server"].get("cache_hit_share") if best else None
            rows.append([f"{name}, {label}", num(limit), num(out["max_sustained_rate"]), ratio(got), f"≥ {goal}",
                         verdict(got >= goal), num(out["p99_at_max_sustained_ms"]),
                         pct(hits) if case == "queries" and hits is not None else "—", num(out["saturation_rate"])])
    flags = r["server_flags"]
    return "\n".join([
        "## Request paths against the raw engine (`python -m bench.paths`)", "",
        "Issue 20: how far one host goes once the front end is the cost. The highest open-loop Poisson rate with no "
        f"failure, ≥ 95% kept up and p99 ≤ {a['p99_bound_ms']:.0f} ms (`bench.kit.rates`, {a['step_s']:g} s steps), "
        f"for unary Score calls and for the same requests as items over {a['streams']} ScoreStream calls, against "
        "the raw engine (fp32, the server's arrangement, its best batch size) on the same inputs. Real pairs with "
        f"the cache off (`python -m server {' '.join(flags['pairs'])}`); a query-only log with the cache on, shaped "
        f"like a search log: {q['repeats']:.0%} of its {q['length']:,} requests drawn from the pairs' "
        f"{q['distinct_head']:,} distinct queries by a Zipf law (s = {q['zipf_s']:g}), the rest seen once, so about "
        f"{q['repeats']:.0%} can come from the cache once its head is warm (the cache-hit column: what it was), "
        f"against the uncached engine on the log's first {q['engine_sample']:,} distinct queries (head and tail as "
        "the log mixes them). The load generator shares the cores.", "",
        machine_line(r["machine"]) + f" Data: {r['data']}.", "",
        *table(["path", "engine limit/s", "sustained/s", "× limit", "goal", "met", "p99 ms at it",
                "cache hits at it", "most OK/s seen"], rows), "",
        "![Achieved against offered rate, by path](docs/bench/paths.png)", "",
        "Reproduce: `python -m bench.paths --model-repo model_repo --out bench_out` (results in "
        "`bench_out/paths/results.json`)."]) + "\n"

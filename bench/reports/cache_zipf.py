"""`python -m bench.cache_zipf`'s report: the cache off and on against the raw engine limit, every step, exactness."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.kit.fmt import num, pct, table, verdict
from bench.kit.machine import machine_line

Step = dict[str, Any]
TARGET = 3.0  # cached max sustained / the uncached engine limit


def plot(r: dict[str, Any], path: Path) -> Path:
    limit = r["engine"]["limit"]
    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    top = TARGET * limit
    for key, name, color in (("cache_off", "cache off", "tab:blue"), ("cache_on", "cache on", "tab:green")):
        steps = r[key]["steps"]
        top = max(top, *(s["offered_rate"] for s in steps))
        ax_tp.plot([s["offered_rate"] for s in steps], [s["achieved_rate"] for s in steps], "o-", color=color,
                   label=name)
        bad = [s for s in steps if not s["sustainable"]]
        ax_tp.plot([s["offered_rate"] for s in bad], [s["achieved_rate"] for s in bad], "x", color="black", ms=7)
        lat = [(s["offered_rate"], s["latency"]["p99_ms"]) for s in steps if s["latency"]["p99_ms"] is not None]
        ax_lat.plot([x for x, _ in lat], [y for _, y in lat], "o-", color=color, label=f"{name} p99")
    ax_tp.plot([0, top * 1.05], [0, top * 1.05], ":", color="grey", label="achieved = offered")
    ax_tp.axhline(limit, color="black", lw=1, ls="--", label=f"raw engine limit ({limit:.0f}/s)")
    ax_tp.axhline(TARGET * limit, color="tab:red", lw=1, ls="--", label=f"target 3 × limit ({TARGET * limit:.0f}/s)")
    ax_tp.set(xlabel="offered load (requests / s, Poisson)", ylabel="achieved (OK responses / s)",
              title=f"Zipf s={r['stream']['s']} stream (x = not sustainable)")
    ax_lat.axhline(r["args"]["p99_bound_ms"], color="black", lw=1, ls=":", label="p99 bound")
    ax_lat.set(yscale="log", xlabel="offered load (requests / s)", ylabel="p99 latency from scheduled send (ms)",
               title="p99 of OK calls")
    for ax in (ax_tp, ax_lat):
        ax.set_xlim(left=0)
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ax_tp.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def failed(s: Step, none: str = "0") -> str:
    return ", ".join(f"{k} {v}" for k, v in s["failures"].items()) or none


def steps_table(steps: Sequence[Step], limit: float, cached: bool) -> list[str]:
    head = ["offered (× limit)", "offered/s", "achieved/s", "× limit", "failed", "p50 ms", "p99 ms",
            *(["requests", "served from cache", "coalesced", "stream implies"] if cached else []),
            "mean batch", "server CPU", "generator CPU", "send lag p99 ms", "foreign CPU", "sustainable"]
    rows = [[num(s["fraction"], 2), num(s["offered_rate"]), num(s["achieved_rate"]), num(s["achieved_rate"] / limit, 2),
             failed(s), num(s["latency"]["p50_ms"]), num(s["latency"]["p99_ms"]),
             *([f"{s['scheduled']:,}", pct(s["cache"]["hit_rate"] or 0, 1), num(s["cache"]["coalesced"], 0),
                pct(s["implied_hit_rate"], 1)] if cached else []),
             num(s["server"]["mean_batch_size"]), num(s["cpu"]["server_cores"], 2), num(s["cpu"]["bench_cores"], 2),
             num(s["send_lag_p99_ms"]), num(s["cpu"]["foreign_cores"], 2),
             "yes" if s["sustainable"] else "no: " + s["verdict"]] for s in steps]
    return table(head, rows, "r" * (len(head) - 1) + "l")


def p99(s: Step) -> str:
    return f"{num(s['latency']['p99_ms'])} ms{'' if s['sustainable'] else ' (not sustainable)'}"


def markdown(r: dict[str, Any]) -> str:
    a, st, eng, off, on, ex = (r[k] for k in ("args", "stream", "engine", "cache_off", "cache_on", "exactness"))
    limit, cx, m = eng["limit"], ex["cached_vs_uncached"], r["machine"]
    best = next((s for s in on["steps"] if s["sustainable"] and s["achieved_rate"] == on["max_sustained_rate"]), None)
    cold, hit, ratio = on.get("cold_start"), st["implied_hit_rate"], on["max_sustained_rate"] / limit
    rows = [[f"raw engine fp32, batch {eng['batch_size']} = **the uncached limit**", f"{num(limit)}/s", "1.00"],
            ["server, cache off: max sustained", f"{num(off['max_sustained_rate'])}/s (p99 "
             f"{num(off['p99_at_max_sustained_ms'])} ms)", num(off["max_sustained_rate"] / limit, 2)],
            ["server, cache on: max sustained", f"**{num(on['max_sustained_rate'])}/s** (p99 "
             f"{num(on['p99_at_max_sustained_ms'])} ms)", f"**{num(ratio, 2)}** (target ≥ {TARGET:.2f}: "
             f"{verdict(ratio >= TARGET)})"],
            ["cache on: served from cache / coalesced at that step", f"{pct(best['cache']['hit_rate'], 1)} / "
             f"{num(best['cache']['coalesced'], 0)} items" if best else "–", ""],
            ["cache on: most completed/s at any step", f"{num(on['saturation_rate'])}/s",
             num(on["saturation_ratio"], 2)],
            *([f"p99 at {x['fraction']:.2f} × limit ({x['offered_rate']:.0f}/s): cache off vs on",
               f"{p99(x)} vs {p99(y)}", ""]
              for x in off["steps"] for y in on["steps"] if abs(x["fraction"] - y["fraction"]) < 1e-6),
            *([[f"cold start at the best sustained rate ({cold['offered_rate']:.0f}/s offered, cache empty as after "
                "a swap): achieved, failed, p99, served from cache", f"{num(cold['achieved_rate'])}/s, "
                f"{failed(cold, 'none')}, {num(cold['latency']['p99_ms'])} ms, "
                f"{pct(cold['cache']['hit_rate'] or 0, 1)}",
                num(cold["achieved_rate"] / limit, 2)]] if cold else []),
            [f"exactness: {cx['answers']} cached answers vs the cache-off server", f"max \\|Δ\\| "
             f"{num(cx['max_abs_diff'], 8)}, {pct(cx['bit_identical_share'], 1)} bit-identical",
             f"{'within' if cx['within_tolerance'] else 'NOT within'} {ex['tolerance_abs']:g}"]]
    warm = (f"each cached step starts with what **{st['warm_requests']:,} earlier requests** put in the cache (sent "
            "once each, unmeasured) and plays" if st.get("warm_requests") else "each cached step starts cold and plays")
    return "\n".join([
        "## Result cache on a Zipf query stream (`python -m bench.cache_zipf`)", "",
        "Throughput and p99 with the result cache off (`--cache-bytes 0`) and on (default bound, "
        f"{on['cache_bytes_bound'] / 2**20:.0f} MiB here) against the raw engine limit, all in one run. Target: at the "
        f"stream's hit rate, sustained throughput ≥ {TARGET:g} × the uncached limit, with no loss in exactness.", "",
        f"{machine_line(m)} CPU features: {', '.join(m['cpu_features']) or 'no AVX-512/AMX'}; run time "
        f"{r['elapsed_s'] / 60:.1f} min.", "",
        f"**The stream.** {st['catalogue']:,} distinct model inputs (cache keys) of {st['pairs_read']:,} pairs from "
        f"{st['source']} (no query frequencies): in a seeded random rank order, drawn from a Zipf law P(k) ∝ k^-s, "
        f"**s = {st['s']:g}** (web query logs: 1.0–1.1). The top 1 / 10 / 100 ranks get {pct(st['top1_share'], 1)} / "
        f"{pct(st['top10_share'], 1)} / {pct(st['top100_share'], 1)} of requests; mean tokens "
        f"{num(st['tokens_mean_stream'])} per request vs {num(st['tokens_mean_catalogue'])} per input. A steady state: "
        f"{warm} **{st['requests_per_step']:,} requests**, of which the stream implies **{pct(hit, 1)} repeat an "
        f"earlier one** ({pct(st['implied_hit_rate_window'], 1)} in the measured last 80%; "
        f"{pct(st['implied_hit_rate_cold'], 1)} from a cold cache). A site per step (in the key) keeps caches apart.",
        "", f"**Method.** Raw engine: `bench.kit.engine.throughput_sweep`, fp32, length-grouped, {eng['arrangement']}, "
        f"median of {eng['rounds']} rounds of ≥ {eng['min_seconds']} s, best batch size. Server: `python -m server "
        "--precision fp32` with the engine's lanes and threads, pinned, under `loadtest.openloop` (Poisson, latency "
        f"from the scheduled send). Cache off: `bench.kit.rates.sweep`, steps of {a['step_s']:g} s; cache on: the same "
        f"search, steps of {st['requests_per_step']:,} / rate s (≤ {a['max_cached_step_s']:g} s: fewer requests, a "
        f"lower *stream implies*). Sustainable = no failures, achieved ≥ 95% of offered, p99 ≤ {a['p99_bound_ms']:g} "
        f"ms (deadline {a['timeout_s']:g} s). Cache shares are of requests received (`model_pv_total`).", "",
        *table(["measure", "value", "× limit"], rows, "lrr"), "",
        f"**Target:** {verdict(ratio >= TARGET and cx['within_tolerance'])}" + (
            f", at {pct(best['cache']['not_computed_rate'])} of requests not computed (hits + coalesced)." if best
            else "; with the cache on no step was sustainable."), "",
        "#### Cache off", "", *steps_table(off["steps"], limit, cached=False), "",
        "#### Cache on", "", *steps_table(on["steps"], limit, cached=True), "",
        f"**Exactness.** The stream ran on its own site at 1 × limit for 5 s, then {cx['answers']} distinct requests "
        f"(top ranks, a random tail) were sent twice: {pct(ex['second_pass_cache']['hit_rate'])} hits the second time, "
        f"{pct(ex['second_vs_first']['bit_identical_share'], 1)} of scores bit-identical to the first; against the "
        f"cache-off server see the table ({cx['scores']:,} scores; tolerance as `tests/test_cache.py`: in fp32, batch "
        "companions can move a score's last bits).", "",
        "![cache on vs off](docs/bench/cache_zipf.png)", "",
        f"**What limits it.** At a {pct(hit, 1)} hit rate, free hits would cap the cached throughput at "
        f"{num(1 / max(1 - hit, 1e-9), 2)} × the limit; but every request, hit or not, costs event-loop time (gRPC, "
        "decoding, tokenizing for the cache key) on the cores the engine and the load generator use (CPU columns).", "",
        "Reproduce: `python -m bench.cache_zipf --model-repo model_repo --out bench_out` (results: "
        "`bench_out/cache_zipf/results.json`)."]) + "\n"

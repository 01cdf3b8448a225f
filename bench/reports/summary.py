"""The `python -m bench` report: where the server's time goes, its section of BENCHMARKS.md and its two plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from bench.kit.fmt import ms, num, pct, ratio, table, verdict
from bench.kit.machine import machine_line

TARGET_RATIO = 0.90
THROUGHPUT_PNG, SERVER_PNG = "throughput_by_batch.png", "server_load.png"
TITLES = {THROUGHPUT_PNG: "Raw engine throughput by batch size",
          SERVER_PNG: "Server: achieved throughput and latency vs offered load"}
SWEEPS = {"server_batched": "batching on", "server_unbatched": "batching off"}
Step = dict[str, Any]


def curve_at(by_bs: dict[str, dict[str, Any]], batch: float | None, key: str = "samples_per_s") -> float:
    """A per-batch-size value at a (fractional) batch size, interpolated on log2(batch size)."""
    xs = sorted(int(b) for b in by_bs)
    return float(np.interp(math.log2(max(batch or 1.0, 1.0)), np.log2(xs), [by_bs[str(x)][key] for x in xs]))


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _per_call_ms(step: Step, key: str) -> float | None:
    return 1000 * step["cpu"][key] / step["achieved_rate"] if step["achieved_rate"] else None


def analysis(results: dict[str, Any]) -> dict[str, Any] | None:
    """The gap between the raw engine and the server, as factors measured in this run. At the saturation step
    (the most calls completed per second):
      rate = limit x G(B)/limit                           [batch size: raw grouped rate at the server's batch B]
                   x (1 - p_server)/(1 - p_grouped(B))    [padding: cost taken as proportional to padded tokens]
                   x E / (G(B) x padding factor)          [engine inside the server vs alone]
                   x busy fraction x residual             [engine idle; answered calls vs computed items]
    Below saturation, `dip` is the engine-bound step (busy >= 90%) with the fewest items per busy second."""
    e, sb, su = results.get("engine"), results.get("server_batched"), results.get("server_unbatched")
    if not e or not sb:
        return None
    grouped = e["grouped"]["fp32"]
    g1 = grouped.get("1", {}).get("samples_per_s")
    sat = max(sb["steps"], key=lambda s: s["achieved_rate"])
    srv = sat["server"]
    g_at, p_at = curve_at(grouped, srv["mean_batch_size"]), curve_at(grouped, srv["mean_batch_size"], "padding_ratio")
    pad = (1.0 - _nan(srv["mean_padding_ratio"])) / (1.0 - p_at)
    e_in, busy = _nan(srv["engine_items_per_busy_s"]), _nan(srv["engine_busy_fraction"])
    bound = [s for s in sb["steps"] if (s["server"]["engine_busy_fraction"] or 0) >= 0.9
             and s["server"]["engine_items_per_busy_s"]]
    dip = min(bound, key=lambda s: s["server"]["engine_items_per_busy_s"]) if bound else None
    return {"limit": e["best"]["fp32"]["samples_per_s"], "batch1": g1, "saturation": sat, "dip": dip,
            "unbatched_saturation": max(su["steps"], key=lambda s: s["achieved_rate"]) if su else None,
            "grouped_at_batch": g_at, "grouped_padding_at_batch": p_at,
            "grouped_at_dip": curve_at(grouped, dip["server"]["mean_batch_size"]) if dip else None,
            "factors": {"batch_size": g_at / e["best"]["fp32"]["samples_per_s"], "padding": pad,
                        "engine_in_server": e_in / (g_at * pad), "engine_busy": busy,
                        "residual": sat["achieved_rate"] / (e_in * busy) if e_in * busy > 0 else float("nan")}}


def headline_rows(results: dict[str, Any]) -> list[list[str]]:
    e = results.get("engine")
    if not e:
        return []
    best = e["best"]["fp32"]
    limit = best["samples_per_s"]

    def rate_row(what: str, rate: float, unit: str = "samples/s") -> list[str]:
        return [what, f"{num(rate)} {unit}", ratio(rate / limit)]

    rows = [rate_row(f"raw engine best fp32 (batch {best['batch_size']}, median of {e['rounds']} runs) = **the "
                     "limit**", limit),
            rate_row(f"raw engine fastest single fp32 run (batch {best['peak_batch_size']})",
                     best["peak_samples_per_s"])]
    if i8 := e["best"].get("int8"):
        rows.append(rate_row(f"raw engine best int8 (batch {i8['batch_size']})", i8["samples_per_s"]))
    if sb := results.get("server_batched"):
        rows.append(["server max sustained throughput (batching on)", f"{num(sb['max_sustained_rate'])} req/s",
                     f"**{ratio(sb['max_sustained_ratio'])}** (target ≥ {ratio(TARGET_RATIO)}: "
                     f"{verdict(sb['max_sustained_ratio'] >= TARGET_RATIO)})"])
        rows.append(rate_row("server saturation throughput (most completed/s at any step, with failures)",
                             sb["saturation_rate"], "req/s"))
        if at80 := next((s for s in sb["steps"] if abs(s["fraction"] - 0.8) < 1e-6), None):
            rows.append([f"latency at 80% of the limit ({num(at80['offered_rate'])} req/s offered)",
                         f"p50 {ms(at80['latency']['p50_ms'])}, p99 {ms(at80['latency']['p99_ms'])}",
                         "sustainable" if at80["sustainable"] else f"not sustainable ({at80['verdict']})"])
        if p := sb.get("engine_probes"):
            rows.append([f"raw engine re-measured before each server step (batch {best['batch_size']})",
                         f"{num(p['min'])}–{num(p['max'])} samples/s", f"{ratio(p['min'] / limit)}–"
                         f"{ratio(p['max'] / limit)}"])
            if p["max"] > 1.1 * limit:
                rows.append(["**caution**: the raw engine ran faster during the server steps than in the sweep; "
                             "against the fastest probe the server's ratio is", f"{num(p['max'])} samples/s",
                             ratio(sb["max_sustained_rate"] / p["max"])])
    if su := results.get("server_unbatched"):
        g1 = e["grouped"]["fp32"].get("1", {}).get("samples_per_s")
        rows.append(rate_row("server max sustained, batching off (`--max-batch-size 1`)", su["max_sustained_rate"],
                             "req/s"))
        rows[-1][2] += f" (× raw fp32 batch 1: {ratio(su['max_sustained_rate'] / g1)})" if g1 else ""
    return rows


def verdicts(results: dict[str, Any], an: dict[str, Any]) -> list[str]:
    """The headline verdict, and the few conclusions this run's numbers support."""
    sb, sat, dip, limit, g1 = results["server_batched"], an["saturation"], an["dip"], an["limit"], an["batch1"]
    out = [f"- The server sustains **{pct(sb['max_sustained_ratio'])}** of the raw engine's best fp32 throughput "
           f"({num(sb['max_sustained_rate'])} of {num(limit)}/s): the {pct(TARGET_RATIO)} target is "
           f"{verdict(sb['max_sustained_ratio'] >= TARGET_RATIO)}. Overloaded, it completed at most "
           f"{num(sat['achieved_rate'])}/s ({pct(sat['achieved_rate'] / limit)}), with failures."]
    e_sat = _nan(sat["server"]["engine_items_per_busy_s"])
    if dip and g1 and dip["server"]["engine_items_per_busy_s"] < 0.85 * min(e_sat, g1):
        out.append(f"- **Mid-load batches are the weak spot**: at {pct(dip['fraction'])} of the limit the engine "
                   "finished fewer items per busy second than at batch 1 or at saturation (*Where the time goes*).")
    if su := results.get("server_unbatched"):
        better = su["max_sustained_rate"] > sb["max_sustained_rate"]
        out.append(f"- Batching off sustains {num(su['max_sustained_rate'])}/s, {'more' if better else 'less'} "
                   "than batching on.")
    return out


STEP_COLUMNS = ["offered (× limit)", "offered/s", "achieved/s", "achieved (× limit)", "failed", "p50 ms", "p90 ms",
                "p99 ms", "p99.9 ms", "max ms", "mean batch", "padding", "engine busy", "engine items / busy s",
                "generator CPU (cores)", "foreign CPU (cores)", "raw probe/s", "sustainable"]


def _step_row(s: Step, limit: float) -> list[str]:
    lat, srv, cpu = s["latency"], s["server"], s["cpu"]
    return [pct(s["fraction"]), num(s["offered_rate"]), num(s["achieved_rate"]), ratio(s["achieved_rate"] / limit),
            ", ".join(f"{k} {v}" for k, v in s["failures"].items()) or "0",
            *(num(lat[k]) for k in ("p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "max_ms")),
            num(srv["mean_batch_size"]), pct(srv["mean_padding_ratio"]), pct(srv["engine_busy_fraction"]),
            num(srv["engine_items_per_busy_s"], 0), num(cpu["bench_cores"], 2), num(cpu["foreign_cores"], 2),
            num(s["engine_probe_before"], 0), "yes" if s["sustainable"] else "no: " + s.get("verdict", "")]


def _rate_cell(r: dict[str, Any] | None) -> str:
    return f"{num(r['samples_per_s'])} ({num(r['samples_per_s_min'], 0)}–{num(r['samples_per_s_max'], 0)})" \
        if r else "–"


def _engine_table(e: dict[str, Any]) -> list[str]:
    fp32, fifo = e["grouped"]["fp32"], e["arrival"].get("fp32", {})
    rows = [[str(bs), *(_rate_cell(by.get(str(bs))) for by in e["grouped"].values()),
             *(_rate_cell(by.get(str(bs))) if bs > 1 else "(= grouped)" for by in e["arrival"].values()),
             pct(fp32.get(str(bs), {}).get("padding_ratio")),
             pct(fifo.get(str(bs), {}).get("padding_ratio")) if bs > 1 else "0%"]
            for bs in sorted({int(b) for by in e["grouped"].values() for b in by})]
    return table(["batch", *(f"{p} grouped" for p in e["grouped"]), *(f"{p} FIFO" for p in e["arrival"]),
                  "padding grouped", "padding FIFO"], rows)


def _where_the_time_goes(results: dict[str, Any], an: dict[str, Any]) -> list[str]:
    sat, f, dip, u = an["saturation"], an["factors"], an["dip"], an["unbatched_saturation"]
    srv, cpu = sat["server"], sat["cpu"]
    e_in = _nan(srv["engine_items_per_busy_s"])
    rows = [["raw engine, best batch size, length-grouped", num(an["limit"]), ratio(1.0), "offline sweep (median)"],
            [f"batch size: the server's batches averaged {num(srv['mean_batch_size'])} items",
             num(an["grouped_at_batch"]), ratio(f["batch_size"]), "offline, grouped, that batch size"],
            [f"padding: {pct(srv['mean_padding_ratio'])} in the server's batches vs "
             f"{pct(an['grouped_padding_at_batch'])} grouped", num(an["grouped_at_batch"] * f["padding"]),
             ratio(f["padding"]), "(1 − padding) ratio: cost ∝ padded tokens"],
            ["engine inside the server vs alone", num(e_in), ratio(f["engine_in_server"]),
             "items per second of `scoring_inference_duration_seconds`"],
            ["engine idle between batches", num(e_in * f["engine_busy"]), ratio(f["engine_busy"]),
             "busy fraction of the step"],
            ["answered calls vs computed items", num(sat["achieved_rate"]), ratio(f["residual"]),
             "OK answers per second in the window"]]
    lines = [f"At saturation ({pct(sat['fraction'])} of the limit offered), factors multiply from the raw limit "
             "down to the server's rate:", "", *table(["stage", "items/s", "factor", "measured as"], rows, "lrrl"), "",
             f"CPU at that step: server {num(cpu['server_cores'], 2)} cores, of which the event loop (gRPC, decoding, "
             f"tokenizing, batching, metrics) {num(cpu['server_event_loop_cores'], 2)} = "
             f"{num(_per_call_ms(sat, 'server_event_loop_cores'), 2)} ms per call; load generator "
             f"{num(cpu['bench_cores'], 2)} cores = {num(_per_call_ms(sat, 'bench_cores'), 2)} ms per call; other "
             f"processes {num(cpu['foreign_cores'], 2)}."]
    if dip:
        sb, d = results["server_batched"], dip["server"]
        lines += ["", f"Below saturation: max sustained {num(sb['max_sustained_rate'])}/s "
                  f"({ratio(sb['max_sustained_ratio'])} limit). Slowest engine-bound step: {pct(dip['fraction'])} "
                  f"of the limit, batches of {num(d['mean_batch_size'])} with {pct(d['mean_padding_ratio'])} "
                  f"padding, {num(d['engine_items_per_busy_s'])} items per busy second (raw grouped there: "
                  f"{num(an['grouped_at_dip'])}; raw batch 1: {num(an['batch1'])})."]
    if u and an["batch1"]:
        us = u["server"]
        lines += ["", f"Batching off: {num(us['engine_items_per_busy_s'])} items per busy second vs "
                  f"{num(an['batch1'])} offline at batch 1 ({ratio(_nan(us['engine_items_per_busy_s']) / an['batch1'])}"
                  f"), busy {pct(us['engine_busy_fraction'])} at its saturation step; event loop "
                  f"{num(_per_call_ms(u, 'server_event_loop_cores'), 2)} ms per call."]
    return lines


def markdown(results: dict[str, Any], pngs: list[str]) -> str:
    """This tool's section of BENCHMARKS.md (also bench_out/summary.md)."""
    m, data, an = results["machine"], results["data"], results.get("analysis")
    lines = ["## Serving: raw engine vs the server (`make bench`)", "",
             "Every number here comes from one run of `python -m bench`. The machines are shared and their speed "
             "drifts, so the server is reported as a ratio of the raw engine's throughput measured in the same run "
             "(`× limit`), with the CPU other processes used meanwhile (`foreign CPU`). CPU only: the CUDA path is "
             "not measured here.", "",
             f"{machine_line(m)} CPU features: {', '.join(m['cpu_features']) or 'no AVX-512/AMX'}; {m['os']}; run "
             f"time {num(results.get('elapsed_s', 0.0) / 60)} min. Data: {data['source']} ({data['pairs']} pairs; "
             f"tokens mean {num(data['tokens_mean'])}, p99 {num(data['tokens_p99'], 0)}).", ""]
    if rows := results.get("headline", {}).get("rows"):
        lines += ["### Headline", "", *table(["measure", "value", "ratio"], rows, "llr"), ""]
    if an:
        lines += [*verdicts(results, an), ""]
    if b := results.get("build"):
        lines += ["### 1. Model build (`python -m tools.build_model --demo --precision int8`)", ""]
        if b["ok"]:
            size = b["file_mib"]
            lines += table(["build time", "model.onnx", "model.int8.onnx", "int8 / fp32 size",
                            "same checksums as the measured model"],
                           [[f"{num(b['seconds'])} s", num(size.get("model.onnx"), 1, " MiB"),
                             num(size.get("model.int8.onnx"), 1, " MiB"), pct(b["int8_size_ratio"]),
                             {True: "yes", False: "**NO**", None: "–"}[b["identical_to_measured_model"]]]], "rrrrl")
        else:
            lines += [f"Build FAILED after {b['seconds']} s:", "", "```", b.get("error", ""), "```"]
        lines += [""]
    if a := results.get("agreement"):
        lines += [f"### 2. int8 vs fp32 agreement ({a['pairs']} {'real' if data['real'] else 'synthetic'} pairs, "
                  f"{a['heads']} heads)", "",
                  *table(["Spearman min (per head)", "Spearman mean", "max abs diff", "mean abs diff", "p99 abs diff",
                          "golden int8 tolerance"],
                         [[*(num(a[k], 4) for k in ("spearman_min", "spearman_mean", "max_abs_diff", "mean_abs_diff",
                                                    "p99_abs_diff")), num(a["golden_int8_tolerance"], 2)]]), ""]
    if e := results.get("engine"):
        lines += [f"### 3. Raw ONNX Runtime throughput (samples/s, median (min–max) of {e['rounds']} interleaved runs "
                  f"of ≥ {e['min_seconds_per_run']} s; {e.get('arrangement', '')})", "", *_engine_table(e), ""]
    for key, title in (("server_batched", "4. Server, fp32, batching on (defaults)"),
                       ("server_unbatched", "4c. Server, fp32, batching off (`--max-batch-size 1`)")):
        if sw := results.get(key):
            lines += [f"### {title}", "",
                      f"Open-loop Poisson, {num(sw['step_s'], 0)} s per step, deadline {num(sw['timeout_s'], 0)} s; "
                      f"× limit = fraction of {num(sw['limit'])}/s ({sw['limit_name']}). Sustainable = no failures, "
                      f"achieved ≥ {pct(sw['keep_up'])} of offered, p99 ≤ {ms(sw['p99_bound_ms'])}. Max sustained: "
                      f"**{num(sw['max_sustained_rate'])}/s**; most completed at any step: "
                      f"{num(sw['saturation_rate'])}/s.", "",
                      *table(STEP_COLUMNS, [_step_row(s, sw["limit"]) for s in sw["steps"]], "r" * 17 + "l"), ""]
    if what_if := results.get("server_what_if"):
        limit = results["engine"]["best"]["fp32"]["samples_per_s"]
        lines += ["### Server flag variants (same offered loads)", "",
                  *table(["server flags", *STEP_COLUMNS], [[f"`{w['flags'] or '(defaults)'}`", *_step_row(w, limit)]
                                                          for w in what_if], "l" + "r" * 17 + "l"), ""]
    if an:
        lines += ["### Where the time goes", "", *_where_the_time_goes(results, an), ""]
    if pngs:
        lines += ["### Plots", "", *(f"![{TITLES[name]}](docs/bench/{name})\n" for name in pngs)]
    lines += ["### Method", "",
              "`make bench` runs `python -m bench --model-repo model_repo --out bench_out` (see `--help`); every "
              "number is in `bench_out/results.json`. Build: timed, seeded, so its checksums must equal the measured "
              "version's. Agreement: Spearman rank correlation per head, absolute differences over all scores. Raw "
              "engine: the server's session options and inputs; *grouped* = sorted by length, then batched (the "
              "least padding: the limit), *FIFO* = arrival order; rounds interleave all configurations. Server: "
              f"`python -m server {' '.join(results.get('server_flags', []))}` under `loadtest.openloop` (Poisson, "
              "latency from the scheduled send time), rates stepped in fractions of the limit then bisected, "
              "achieved = OK answers per second after the first 20% of a step, a step run again when other "
              "processes used > 0.3 cores; batch, padding and engine busy from `/metrics`, CPU from `/proc`."]
    return "\n".join(lines).rstrip() + "\n"


def _finish(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)  # small PNGs: they live in docs/
    plt.close(fig)
    return path


def plot_throughput(engine: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for policy, style, label in (("grouped", "o-", "length-grouped"), ("arrival", "s--", "arrival-order (FIFO)")):
        for precision, by_bs in engine[policy].items():
            rows = {1: engine["grouped"][precision].get("1"), **{int(b): r for b, r in by_bs.items()}}
            xs = [x for x in sorted(rows) if rows[x]]  # FIFO at batch 1 is the grouped run
            ys = np.array([rows[x]["samples_per_s"] for x in xs])
            err = [ys - [rows[x]["samples_per_s_min"] for x in xs], [rows[x]["samples_per_s_max"] for x in xs] - ys]
            ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, color={"fp32": "tab:blue"}.get(precision, "tab:orange"),
                        alpha=1.0 if policy == "grouped" else 0.6, label=f"{precision}, {label} batches")
    for best in engine["best"].values():
        ax.annotate(f"{best['samples_per_s']:.0f}/s", (best["batch_size"], best["samples_per_s"]),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({int(b) for by in engine["grouped"].values() for b in by}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set(xlabel="batch size", ylabel="samples / s", ylim=(0, ax.get_ylim()[1] * 1.08))  # room for the labels
    ax.set_title("Raw ONNX Runtime throughput: median, bars = min–max of runs", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_server(results: dict[str, Any], path: Path) -> Path:
    sweeps = {name: results[key] for key, name in SWEEPS.items() if key in results}
    first = next(iter(sweeps.values()))
    limit = results["engine"]["best"]["fp32"]["samples_per_s"]
    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    top = limit
    for color, (name, sw) in zip(("tab:blue", "tab:green"), sweeps.items(), strict=False):
        steps = sw["steps"]
        top = max(top, *(s["offered_rate"] for s in steps))
        ax_tp.plot([s["offered_rate"] for s in steps], [s["achieved_rate"] for s in steps], "o-", color=color,
                   label=name)
        bad = [s for s in steps if not s["sustainable"]]
        ax_tp.plot([s["offered_rate"] for s in bad], [s["achieved_rate"] for s in bad], "x", color="black", ms=7)
        ok = [s for s in steps if s["latency"]["p50_ms"] is not None]
        for q, style in (("p50", "o--"), ("p99", "o-")):
            ax_lat.plot([s["offered_rate"] for s in ok], [s["latency"][f"{q}_ms"] for s in ok], style, color=color,
                        label=f"{name} {q}")
    ax_tp.plot([0, top * 1.05], [0, top * 1.05], ":", color="grey", label="achieved = offered")
    ax_tp.axhline(limit, color="black", lw=1, ls="--", label=f"raw engine best fp32 ({limit:.0f}/s)")
    ax_tp.set(xlabel="offered load (requests / s, Poisson)", ylabel="achieved (OK responses / s)", xlim=(0, None),
              ylim=(0, None))
    ax_tp.set_title("Throughput (x = step not sustainable)", fontsize=10)
    ax_lat.axhline(first["p99_bound_ms"], color="black", lw=1, ls=":", label=f"p99 bound {ms(first['p99_bound_ms'])}")
    ax_lat.axvline(limit, color="black", lw=1, ls="--")
    ax_lat.set(yscale="log", xlabel="offered load (requests / s)", ylabel="latency from scheduled send (ms)",
               xlim=(0, None))
    ax_lat.set_title(f"Latency of OK calls (the {first['timeout_s']:g} s deadline caps it)", fontsize=10)
    for ax in (ax_tp, ax_lat):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return _finish(fig, path)


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    pngs = [plot_throughput(results["engine"], out / THROUGHPUT_PNG)] if "engine" in results else []
    if any(key in results for key in SWEEPS):
        pngs.append(plot_server(results, out / SERVER_PNG))
    return pngs

"""Where the server's time goes (from numbers measured in the same run), the Markdown summary, BENCHMARKS.md."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

TARGET_RATIO = 0.90


def _fmt(x: float | None, digits: int = 1, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}{suffix}"


def _pct(x: float | None, digits: int = 0) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def curve_at(by_bs: dict[str, dict[str, Any]], batch: float, key: str = "samples_per_s",
             at_1: float | None = None) -> float:
    """A per-batch-size value at a (fractional) batch size, interpolated on log2(batch size)."""
    points = {int(b): row[key] for b, row in by_bs.items()}
    if at_1 is not None:
        points.setdefault(1, at_1)
    xs = sorted(points)
    return float(np.interp(math.log2(max(batch, 1.0)), [math.log2(x) for x in xs], [points[x] for x in xs]))


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def overhead_analysis(engine: dict[str, Any], batched: dict[str, Any], unbatched: dict[str, Any] | None
                      ) -> dict[str, Any]:
    """Splits the gap between the raw engine and the server into factors measured in this run.

    At the server's saturation step (the most calls completed per second):
      rate = limit x G(B)/limit                        [batch size: raw grouped rate at the server's batch size B]
                   x (1 - p_server)/(1 - p_grouped(B))   [padding: cost taken as proportional to padded tokens]
                   x E / (G(B) x padding factor)         [engine inside the server vs alone]
                   x busy fraction                       [engine idle]
                   x residual                            [answered calls vs computed items]
    and below saturation, the engine's items per busy second at every step (the batch-size dip).
    """
    limit = engine["best"]["fp32"]["samples_per_s"]
    grouped = engine["grouped"]["fp32"]
    g1 = grouped["1"]["samples_per_s"] if "1" in grouped else None
    sat = max(batched["steps"], key=lambda s: s["achieved_rate"])
    srv = sat["server"]
    batch = srv["mean_batch_size"] or 1.0
    g_at = curve_at(grouped, batch)
    p_grouped = curve_at(grouped, batch, key="padding_ratio")
    p_server = _nan(srv["mean_padding_ratio"])
    pad = (1.0 - p_server) / (1.0 - p_grouped)
    e_in = _nan(srv["engine_items_per_busy_s"])
    busy = _nan(srv["engine_busy_fraction"])
    rate = sat["achieved_rate"]
    out: dict[str, Any] = {"limit": limit, "batch1": g1}
    out["saturation"] = {
        "step_fraction": sat["fraction"],
        "achieved_rate": rate,
        "ratio": rate / limit,
        "mean_batch_size": batch,
        "server_padding_ratio": p_server,
        "offline_grouped_padding_at_batch": p_grouped,
        "offline_grouped_rate_at_batch": g_at,
        "engine_items_per_busy_s": e_in,
        "engine_busy_fraction": busy,
        "factors": {
            "batch_size": g_at / limit,
            "padding": pad,
            "engine_in_server": e_in / (g_at * pad),
            "engine_busy": busy,
            "residual": rate / (e_in * busy) if e_in * busy > 0 else float("nan"),
        },
        "server_cores": sat["cpu"]["server_cores"],
        "event_loop_cores": sat["cpu"]["server_event_loop_cores"],
        "event_loop_ms_per_call": 1000 * sat["cpu"]["server_event_loop_cores"] / rate if rate else None,
        "generator_cores": sat["cpu"]["bench_cores"],
        "generator_ms_per_call": 1000 * sat["cpu"]["bench_cores"] / rate if rate else None,
        "foreign_cores": sat["cpu"]["foreign_cores"],
    }
    # Engine-bound steps (busy >= 90%): how many items the engine finished per busy second at each batch size.
    bound = [s for s in batched["steps"] if (s["server"]["engine_busy_fraction"] or 0) >= 0.9
             and s["server"]["engine_items_per_busy_s"]]
    dip = min(bound, key=lambda s: s["server"]["engine_items_per_busy_s"]) if bound else None
    good = [s for s in batched["steps"] if s["sustainable"]]
    best = max(good, key=lambda s: s["achieved_rate"]) if good else None
    out["sustained"] = {
        "max_sustained_rate": batched["max_sustained_rate"],
        "ratio": batched["max_sustained_rate"] / limit,
        "vs_saturation": batched["max_sustained_rate"] / rate if rate else None,
        "best_step": {k: best[k] for k in ("fraction", "achieved_rate", "latency", "server")} if best else None,
        "dip_step": {k: dip[k] for k in ("fraction", "offered_rate", "achieved_rate", "latency", "server")}
        if dip else None,
        "dip_offline_grouped_rate": curve_at(grouped, dip["server"]["mean_batch_size"] or 1.0) if dip else None,
    }
    if unbatched is not None and g1 is not None:
        u = max(unbatched["steps"], key=lambda s: s["achieved_rate"])
        us = u["server"]
        out["unbatched"] = {
            "step_fraction": u["fraction"],
            "achieved_rate": u["achieved_rate"],
            "max_sustained_rate": unbatched["max_sustained_rate"],
            "offline_batch1_rate": g1,
            "engine_items_per_busy_s": us["engine_items_per_busy_s"],
            "engine_busy_fraction": us["engine_busy_fraction"],
            "engine_in_server": _nan(us["engine_items_per_busy_s"]) / g1,
            "event_loop_cores": u["cpu"]["server_event_loop_cores"],
            "event_loop_ms_per_call": 1000 * u["cpu"]["server_event_loop_cores"] / u["achieved_rate"]
            if u["achieved_rate"] else None,
            "foreign_cores": u["cpu"]["foreign_cores"],
        }
    return out


# --- Markdown ------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    sep = [("---:" if (align[i] if i < len(align) else "r") == "r" else "---") for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _steps_table(sweep: dict[str, Any]) -> list[str]:
    rows = []
    for s in sweep["steps"]:
        lat, srv, cpu = s["latency"], s["server"], s["cpu"]
        fails = ", ".join(f"{k} {v}" for k, v in s["failures"].items()) or "0"
        rows.append([
            _pct(s["fraction"]), _fmt(s["offered_rate"]), _fmt(s["achieved_rate"]),
            f"{s['achieved_rate'] / sweep['limit']:.2f}", fails,
            _fmt(lat["p50_ms"]), _fmt(lat["p90_ms"]), _fmt(lat["p99_ms"]), _fmt(lat["p99.9_ms"]), _fmt(lat["max_ms"]),
            _fmt(srv["mean_batch_size"]), _pct(srv["mean_padding_ratio"]), _pct(srv["engine_busy_fraction"]),
            _fmt(srv["engine_items_per_busy_s"], 0), _fmt(cpu["bench_cores"], 2), _fmt(cpu["foreign_cores"], 2),
            _fmt(s["engine_probe_before"], 0), "yes" if s["sustainable"] else "no: " + s["verdict"],
        ])
    return _table(["offered (× limit)", "offered/s", "achieved/s", "achieved (× limit)", "failed", "p50 ms",
                   "p90 ms", "p99 ms", "p99.9 ms", "max ms", "mean batch", "padding", "engine busy",
                   "engine items / busy s", "generator CPU (cores)", "foreign CPU (cores)", "raw probe/s",
                   "sustainable"], rows, "r" * 17 + "l")


def _rate_cell(row: dict[str, Any] | None) -> str:
    if not row:
        return "–"
    return f"{row['samples_per_s']:.1f} ({row['samples_per_s_min']:.0f}–{row['samples_per_s_max']:.0f})"


def summary_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['cpu_model']}, {m['usable_cpus']} CPUs, {m['ram_gib']} GiB RAM, onnxruntime "
             f"{m['onnxruntime']}, Python {m['python']}, {m['date']}, code {m['git']}.",
             f"Data: {results['data']['source']} ({results['data']['pairs']} pairs; tokens mean "
             f"{results['data']['tokens_mean']:.1f}, p99 {results['data']['tokens_p99']:.0f}).", ""]
    headline = results.get("headline")
    if headline and headline["rows"]:
        lines += ["### Headline", ""]
        lines += _table(["measure", "value", "ratio"], headline["rows"], "llr")
        lines += [""]

    b = results.get("build")
    if b:
        lines += ["### 1. Model build (`python -m tools.build_model --demo --precision int8`)", ""]
        if b.get("ok"):
            mib = b["file_mib"]
            lines += _table(["build time", "model.onnx", "model.int8.onnx", "int8 / fp32 size",
                             "same checksums as the measured model"],
                            [[f"{b['seconds']:.1f} s", f"{mib.get('model.onnx', 0):.1f} MiB",
                              f"{mib.get('model.int8.onnx', 0):.1f} MiB", _pct(b["int8_size_ratio"]),
                              {True: "yes", False: "NO", None: "–"}[b["identical_to_measured_model"]]]], "rrrrl")
        else:
            lines += [f"Build FAILED after {b['seconds']} s:", "", "```", b.get("error", ""), "```"]
        lines += [""]

    a = results.get("agreement")
    if a:
        kind = "real" if results["data"]["real"] else "synthetic"
        lines += [f"### 2. int8 vs fp32 agreement ({a['pairs']} {kind} pairs, {a['heads']} heads)", ""]
        lines += _table(["Spearman min (per head)", "Spearman mean", "max abs diff", "mean abs diff",
                         "p99 abs diff", "golden int8 tolerance"],
                        [[f"{a['spearman_min']:.4f}", f"{a['spearman_mean']:.4f}", f"{a['max_abs_diff']:.4f}",
                          f"{a['mean_abs_diff']:.4f}", f"{a['p99_abs_diff']:.4f}",
                          _fmt(a["golden_int8_tolerance"], 2)]])
        lines += [""]

    e = results.get("engine")
    if e:
        lines += [f"### 3. Raw ONNX Runtime throughput (samples/s, median (min–max) of {e['rounds']} interleaved "
                  f"runs of ≥ {e['min_seconds_per_run']} s; {e['threads']} intra-op threads)", ""]
        sizes = sorted({int(bs) for by in e["grouped"].values() for bs in by})
        first = next(iter(e["grouped"].values()))
        fifo: dict[str, Any] = next(iter(e["arrival"].values()), {})
        header = ["batch"] + [f"{p} grouped" for p in e["grouped"]] + [f"{p} FIFO" for p in e["arrival"]] + \
            ["padding grouped", "padding FIFO"]
        rows = []
        for bs in sizes:
            row = [str(bs)]
            row += [_rate_cell(by.get(str(bs))) for by in e["grouped"].values()]
            row += [_rate_cell(by.get(str(bs))) if bs > 1 else "(= grouped)" for by in e["arrival"].values()]
            row += [_pct(first.get(str(bs), {}).get("padding_ratio")),
                    _pct(fifo.get(str(bs), {}).get("padding_ratio")) if bs > 1 else "0%"]
            rows.append(row)
        lines += _table(header, rows)
        lines += ["", "Best (by median): " + "; ".join(
            f"{p} {v['samples_per_s']:.1f} samples/s at batch {v['batch_size']} (fastest single run "
            f"{v['peak_samples_per_s']:.1f} at batch {v['peak_batch_size']})" for p, v in e["best"].items()) + ".",
                  ""]

    for key, title in (("server_batched", "4. Server, fp32, batching on (defaults)"),
                       ("server_unbatched", "4c. Server, fp32, batching off (`--max-batch-size 1`)")):
        sw = results.get(key)
        if not sw:
            continue
        lines += [f"### {title}", "",
                  f"Open-loop Poisson, {sw['step_s']:.0f} s per step, deadline {sw['timeout_s']:.0f} s; "
                  f"× limit = fraction of {sw['limit']:.1f}/s ({sw['limit_name']}). Sustainable = no failures, "
                  f"achieved ≥ {sw['keep_up']:.0%} of offered, p99 ≤ {sw['p99_bound_ms']:.0f} ms. "
                  f"Max sustained: **{sw['max_sustained_rate']:.1f}/s**; most completed at any step: "
                  f"{sw['saturation_rate']:.1f}/s.", ""]
        lines += _steps_table(sw)
        lines += [""]
    what_if = results.get("server_what_if")
    if what_if:
        limit = results["engine"]["best"]["fp32"]["samples_per_s"]
        lines += ["### Server flag variants (same offered loads)", ""]
        rows = [[f"`{w['flags'] or '(defaults)'}`", _pct(w["fraction"]), _fmt(w["offered_rate"]),
                 _fmt(w["achieved_rate"]), f"{w['achieved_rate'] / limit:.2f}",
                 ", ".join(f"{k} {v}" for k, v in w["failures"].items()) or "0",
                 _fmt(w["latency"]["p50_ms"]), _fmt(w["latency"]["p99_ms"]), _fmt(w["server"]["mean_batch_size"]),
                 _pct(w["server"]["mean_padding_ratio"]), _fmt(w["server"]["engine_items_per_busy_s"], 0)]
                for w in what_if]
        lines += _table(["server flags", "offered (× limit)", "offered/s", "achieved/s", "achieved (× limit)",
                         "failed", "p50 ms", "p99 ms", "mean batch", "padding", "engine items / busy s"], rows,
                        "lrrrrrrrrrr")
        lines += [""]

    an = results.get("analysis")
    if an:
        lines += analysis_markdown(an)
    return "\n".join(lines).rstrip() + "\n"


def analysis_markdown(an: dict[str, Any]) -> list[str]:
    b = an["saturation"]
    f = b["factors"]
    lines = ["### Where the time goes", "",
             f"At saturation ({_pct(b['step_fraction'])} of the limit offered; the most calls completed per "
             "second), factors multiply from the raw limit down to the server's rate:", ""]
    rows = [
        ["raw engine, best batch size, length-grouped", _fmt(an["limit"]), "1.00", "offline sweep (median)"],
        [f"batch size: the server's batches averaged {b['mean_batch_size']:.1f} items",
         _fmt(b["offline_grouped_rate_at_batch"]), f"{f['batch_size']:.2f}", "offline, grouped, that batch size"],
        [f"padding: {_pct(b['server_padding_ratio'])} in the server's batches vs "
         f"{_pct(b['offline_grouped_padding_at_batch'])} grouped",
         _fmt(b["offline_grouped_rate_at_batch"] * f["padding"]), f"{f['padding']:.2f}",
         "(1 − padding) ratio: cost ∝ padded tokens"],
        ["engine inside the server vs alone", _fmt(b["engine_items_per_busy_s"]), f"{f['engine_in_server']:.2f}",
         "items per second of `scoring_inference_duration_seconds`"],
        ["engine idle between batches", _fmt(b["engine_items_per_busy_s"] * b["engine_busy_fraction"]),
         f"{f['engine_busy']:.2f}", "busy fraction of the step"],
        ["answered calls vs computed items", _fmt(b["achieved_rate"]), f"{f['residual']:.2f}",
         "OK answers per second in the window"],
    ]
    lines += _table(["stage", "items/s", "factor", "measured as"], rows, "lrrl")
    lines += ["", f"Server CPU at that step: {b['server_cores']:.2f} cores, of which the event loop (gRPC, "
              f"decoding, tokenizing, batching, metrics) {b['event_loop_cores']:.2f} cores = "
              f"{_fmt(b['event_loop_ms_per_call'], 2)} ms per call; the load generator "
              f"{b['generator_cores']:.2f} cores ({_fmt(b['generator_ms_per_call'], 2)} ms per call); "
              f"other processes {b['foreign_cores']:.2f} cores."]
    s = an["sustained"]
    dip = s.get("dip_step")
    if dip:
        d = dip["server"]
        lines += ["", f"Below saturation: the max sustained rate is {s['max_sustained_rate']:.1f}/s "
                  f"({s['ratio']:.2f} × limit, {_fmt(s['vs_saturation'], 2)} × saturation). The engine's "
                  f"slowest engine-bound step was at {_pct(dip['fraction'])} of the limit: batches of "
                  f"{_fmt(d['mean_batch_size'])} items with {_pct(d['mean_padding_ratio'])} padding, "
                  f"{_fmt(d['engine_items_per_busy_s'])} items per busy second (raw grouped at that batch size: "
                  f"{_fmt(s['dip_offline_grouped_rate'])}; raw at batch 1: {_fmt(an['batch1'])})."]
    u = an.get("unbatched")
    if u:
        lines += ["", f"Batching off: the engine ran {_fmt(u['engine_items_per_busy_s'])} items per busy second vs "
                  f"{_fmt(u['offline_batch1_rate'])} offline at batch 1 ({u['engine_in_server']:.2f}×), busy "
                  f"{_pct(u['engine_busy_fraction'])} at its saturation step; event loop "
                  f"{_fmt(u['event_loop_ms_per_call'], 2)} ms per call."]
    return [*lines, ""]


def headline_rows(results: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    e = results.get("engine")
    if not e:
        return rows
    best = e["best"]["fp32"]
    limit = best["samples_per_s"]
    rows.append([f"raw engine best fp32 (batch {best['batch_size']}, median of {e['rounds']} runs) = **the limit**",
                 f"{limit:.1f} samples/s", "1.00"])
    rows.append([f"raw engine fastest single fp32 run (batch {best['peak_batch_size']})",
                 f"{best['peak_samples_per_s']:.1f} samples/s", f"{best['peak_samples_per_s'] / limit:.2f}"])
    if "int8" in e["best"]:
        i8 = e["best"]["int8"]
        rows.append([f"raw engine best int8 (batch {i8['batch_size']})", f"{i8['samples_per_s']:.1f} samples/s",
                     f"{i8['samples_per_s'] / limit:.2f}"])
    sb = results.get("server_batched")
    if sb:
        ok = sb["max_sustained_ratio"] >= TARGET_RATIO
        rows.append(["server max sustained throughput (batching on)", f"{sb['max_sustained_rate']:.1f} req/s",
                     f"**{sb['max_sustained_ratio']:.2f}** (target ≥ {TARGET_RATIO:.2f}: "
                     f"{'met' if ok else 'NOT met'})"])
        rows.append(["server saturation throughput (most completed/s at any step, with failures)",
                     f"{sb['saturation_rate']:.1f} req/s", f"{sb['saturation_ratio']:.2f}"])
        at80 = next((s for s in sb["steps"] if abs(s["fraction"] - 0.8) < 1e-6), None)
        if at80:
            lat = at80["latency"]
            rows.append([f"latency at 80% of the limit ({at80['offered_rate']:.1f} req/s offered)",
                         f"p50 {_fmt(lat['p50_ms'])} ms, p99 {_fmt(lat['p99_ms'])} ms",
                         "sustainable" if at80["sustainable"] else f"not sustainable ({at80['verdict']})"])
        if sb.get("engine_probes"):
            p = sb["engine_probes"]
            rows.append([f"raw engine re-measured before each server step (batch {best['batch_size']}, 2 s)",
                         f"{p['min']:.1f}–{p['max']:.1f} samples/s", f"{p['min'] / limit:.2f}–{p['max'] / limit:.2f}"])
            if p["max"] > 1.1 * limit:
                rows.append(["**caution**: the raw engine ran faster during the server steps than in the sweep; "
                             "against the fastest probe the server's ratio is", f"{p['max']:.1f} samples/s",
                             f"{sb['max_sustained_rate'] / p['max']:.2f}"])
    su = results.get("server_unbatched")
    if su:
        g1 = e["grouped"]["fp32"].get("1", {}).get("samples_per_s")
        rate = su["max_sustained_rate"]
        rows.append(["server max sustained, batching off (`--max-batch-size 1`)", f"{rate:.1f} req/s",
                     f"{rate / limit:.2f}" + (f" (× raw fp32 batch 1: {rate / g1:.2f})" if g1 else "")])
    return rows

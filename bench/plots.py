"""Step 5: small PNG plots (kept under ~60 KB each so they can live in docs/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DPI = 80
THROUGHPUT_PNG = "throughput_by_batch.png"
SERVER_PNG = "server_load.png"


def plot_throughput(engine: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    styles = {"fp32": "tab:blue", "int8": "tab:orange"}
    top = 0.0
    for precision, by_bs in engine["grouped"].items():
        xs = sorted(int(b) for b in by_bs)
        rows = [by_bs[str(b)] for b in xs]
        ys = [r["samples_per_s"] for r in rows]
        err = [[y - r.get("samples_per_s_min", y) for y, r in zip(ys, rows, strict=True)],
               [r.get("samples_per_s_max", y) - y for y, r in zip(ys, rows, strict=True)]]
        top = max(top, *(r.get("samples_per_s_max", 0.0) for r in rows))
        ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, color=styles.get(precision),
                    label=f"{precision}, length-grouped batches")
        best = engine["best"][precision]
        ax.annotate(f"{best['samples_per_s']:.0f}/s", (best["batch_size"], best["samples_per_s"]),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    for precision, by_bs in engine["arrival"].items():
        xs = sorted(int(b) for b in by_bs)
        grouped_1 = engine["grouped"][precision].get("1")
        ys = [by_bs[str(b)]["samples_per_s"] for b in xs]
        if grouped_1 is not None:
            xs, ys = [1, *xs], [grouped_1["samples_per_s"], *ys]
        ax.plot(xs, ys, "s--", color=styles.get(precision), alpha=0.6,
                label=f"{precision}, arrival-order batches (FIFO)")
    ax.set_ylim(0, top * 1.12 if top else None)
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 8, 16, 32, 64])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples / s")
    ax.set_title("Raw ONNX Runtime throughput: median, bars = min–max of runs", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_server(sweeps: dict[str, dict[str, Any]], limit: float, p99_bound_ms: float, timeout_s: float,
                path: Path) -> Path:
    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    colors = ["tab:blue", "tab:green", "tab:red", "tab:purple"]
    top = limit
    for color, (name, sw) in zip(colors, sweeps.items(), strict=False):
        steps = sw["steps"]
        offered = [s["offered_rate"] for s in steps]
        achieved = [s["achieved_rate"] for s in steps]
        top = max(top, *offered)
        ax_tp.plot(offered, achieved, "o-", color=color, label=name)
        for s in steps:
            if not s["sustainable"]:
                ax_tp.plot(s["offered_rate"], s["achieved_rate"], "x", color="black", ms=7)
        ok = [(s["offered_rate"], s["latency"]["p50_ms"], s["latency"]["p99_ms"]) for s in steps
              if s["latency"]["p50_ms"] is not None]
        if ok:
            ax_lat.plot([o[0] for o in ok], [o[1] for o in ok], "o--", color=color, label=f"{name} p50")
            ax_lat.plot([o[0] for o in ok], [o[2] for o in ok], "o-", color=color, label=f"{name} p99")
    ax_tp.plot([0, top * 1.05], [0, top * 1.05], ":", color="grey", label="achieved = offered")
    ax_tp.axhline(limit, color="black", lw=1, ls="--", label=f"raw engine best fp32 ({limit:.0f}/s)")
    ax_tp.set_xlabel("offered load (requests / s, Poisson)")
    ax_tp.set_ylabel("achieved (OK responses / s)")
    ax_tp.set_title("Throughput (x = step not sustainable)", fontsize=10)
    ax_tp.set_xlim(left=0)
    ax_tp.set_ylim(bottom=0)
    ax_tp.grid(alpha=0.3)
    ax_tp.legend(fontsize=7)
    ax_lat.axhline(p99_bound_ms, color="black", lw=1, ls=":", label=f"p99 bound {p99_bound_ms:.0f} ms")
    ax_lat.axvline(limit, color="black", lw=1, ls="--")
    ax_lat.set_yscale("log")
    ax_lat.set_xlabel("offered load (requests / s)")
    ax_lat.set_ylabel("latency from scheduled send (ms)")
    ax_lat.set_title(f"Latency of OK calls (the {timeout_s:g} s deadline caps it)", fontsize=10)
    ax_lat.set_xlim(left=0)
    ax_lat.grid(alpha=0.3, which="both")
    ax_lat.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path

"""PNG plots of a run (latency histogram) and of a sweep (latency and throughput against offered load)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np

DPI = 80
HISTOGRAM_PNG = "latency_histogram.png"
SWEEP_PNG = "sweep.png"


def plot_latency_histogram(latencies_s: np.ndarray, summary: Mapping[str, Any], path: Path, title: str) -> Path:
    """Histogram of OK latencies on log-spaced bins (latency tails span decades), percentiles marked."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ms = np.asarray(latencies_s, float) * 1000.0
    ms = ms[np.isfinite(ms) & (ms > 0)]
    if ms.size:
        lo, hi = float(ms.min()), float(ms.max())
        bins: list[float] | int = np.geomspace(lo * 0.95, hi * 1.05, 50).tolist() if hi > lo else 10
        ax.hist(ms, bins=bins, color="tab:blue", alpha=0.8)
        ax.set_xscale("log")
        lat = summary["latency"]
        for key, color in (("p50_ms", "tab:green"), ("p99_ms", "tab:orange"), ("p99.9_ms", "tab:red")):
            if lat.get(key) is not None:
                ax.axvline(lat[key], color=color, linestyle="--", label=f"{key[:-3]} {lat[key]:.1f} ms")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no successful calls", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("OK calls")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_sweep(sweep: Mapping[str, Any], path: Path, title: str) -> Path:
    """Two panels against offered load: p50/p99 latency with the objective, achieved throughput with y = x."""
    steps = sorted(sweep["steps"], key=lambda s: s["offered_rate"])
    offered = [s["offered_rate"] for s in steps]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True)
    for key, style in (("p50_ms", "o-"), ("p99_ms", "s-")):
        xs = [x for x, s in zip(offered, steps, strict=True) if s["latency"][key] is not None]
        ys = [s["latency"][key] for s in steps if s["latency"][key] is not None]
        top.plot(xs, ys, style, label=key[:-3])
    top.axhline(sweep["p99_objective_ms"], color="tab:red", linestyle="--",
                label=f"p99 objective {sweep['p99_objective_ms']:g} ms")
    bad = [(x, s["latency"]["p99_ms"]) for x, s in zip(offered, steps, strict=True)
           if not s["sustainable"] and s["latency"]["p99_ms"] is not None]
    if bad:
        top.scatter(*zip(*bad, strict=True), marker="x", color="tab:red", zorder=3, label="not sustainable")
    top.set_yscale("log")
    top.set_ylabel("latency (ms)")
    top.legend(fontsize=8)
    top.set_title(title, fontsize=9)
    bottom.plot(offered, [s["achieved_rate"] for s in steps], "o-", label="achieved (OK/s)")
    if offered:
        bottom.plot([0, max(offered)], [0, max(offered)], ":", color="grey", label="achieved = offered")
    if sweep["max_rate"]:
        bottom.axvline(sweep["max_offered_rate"], color="tab:green", linestyle="--",
                       label=f"max sustainable {sweep['max_offered_rate']:.0f}/s")
    bottom.set_xlabel("offered load (requests/s)")
    bottom.set_ylabel("throughput (requests/s)")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path

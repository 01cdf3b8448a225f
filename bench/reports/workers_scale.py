"""`python -m bench.workers_scale`'s report: each workers × threads configuration against the raw engine limit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.kit.fmt import num, pct, table
from bench.kit.machine import machine_line


def plot(r: dict[str, Any], path: Path) -> Path:
    limit, runs, fixed = r["engine"]["limit"], r["configs"], r["args"]["fixed_fraction"]
    xs = range(len(runs))
    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    ax_tp.bar(xs, [x["max_sustained_rate"] for x in runs], color="tab:blue", label="max sustained")
    ax_tp.plot(xs, [x["saturation_rate"] for x in runs], "kx", label="most completed/s (any step)")
    ax_tp.axhline(limit, color="black", ls="--", lw=1, label=f"raw engine limit ({limit:.0f}/s)")
    ax_tp.set(ylabel="requests / s", title="Max sustained throughput (cache off)")
    for dx, q, color in ((-0.2, "p50_ms", "tab:green"), (0.2, "p99_ms", "tab:red")):
        ax_lat.bar([x + dx for x in xs], [x["fixed_load_step"]["latency"][q] or 0.0 for x in runs], width=0.4,
                   color=color, label=q[:3])
    ax_lat.set(ylabel="ms", title=f"Latency at a fixed load: {fixed:.0%} of the limit ({fixed * limit:.0f}/s)")
    for ax in (ax_tp, ax_lat):
        ax.set_xticks(list(xs), [f"{x['workers']} × {x['threads_per_worker']}t" for x in runs])
        ax.set(xlabel="workers × intra-op threads per worker")
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def shape(run: dict[str, Any], default_lanes: int) -> str:
    """'2 × 1' (workers × threads per run, one run at a time) or '1 × 2 lanes × 1 (default)'."""
    return (f"{run['workers']} × {run['threads_per_worker']}" if run["threads_flag"]
            else f"{run['workers']} × {run.get('lanes_per_worker', default_lanes)} lanes × 1 (default)")


def verdicts(runs: list[dict[str, Any]], cores: int) -> list[str]:
    """The best multi-worker configuration against the first (by what it completed when one sustained nothing)."""
    key = "max_sustained_rate" if all(x["max_sustained_rate"] > 0 for x in runs) else "saturation_rate"
    what = "max sustained rate" if key == "max_sustained_rate" else "completions/s (one sustained no step)"
    multi, base = [x for x in runs if x["workers"] > 1], runs[0]
    if not multi or base[key] <= 0:
        return []
    best = max(multi, key=lambda x: x[key])
    gain = best[key] / base[key]
    than = "about the same as" if 0.95 <= gain <= 1.05 else "more than" if gain > 1.05 else "less than"
    return [f"- The best multi-worker configuration ({shape(best, cores)}) did **{gain:.2f} ×** the {what} of "
            f"{shape(base, cores)}: {than} one worker.",
            f"- On {cores} cores workers add no compute (one worker's engine keeps every core busy); they share the "
            "cores differently: an event loop each (helps only if it is the bottleneck), each batching only its share "
            "of the traffic (*mean batch*, *ms per batch*), and more threads than cores take turns on them.",
            f"- `--workers N` is for machines with more cores than one engine uses well, or a Python-bound event loop; "
            f"on this {cores}-core machine run the default (1 worker, one single-threaded batch per core)"
            + (", unless a multi-worker row above is clearly ahead" if gain > 1.05 else "") + "."]


def markdown(r: dict[str, Any]) -> str:
    a, eng, m, runs = r["args"], r["engine"], r["machine"], r["configs"]
    limit, cores, fx_frac = eng["limit"], m["usable_cpus"], a["fixed_fraction"]
    dflt = r.get("default_threads", cores)  # the server's --intra-op-threads 0 on the measured machine
    rows = []
    for run in runs:
        fx, b = run["fixed_load_step"], runs[0]["max_sustained_rate"]
        tot = sum(fx["per_worker_items"]) or 1.0
        rows.append([shape(run, dflt), str(run["total_threads"]), num(run["max_sustained_rate"]),
                     num(run["max_sustained_ratio"], 2), num(run["max_sustained_rate"] / b if b else None, 2),
                     num(run["saturation_rate"]), f"{num(fx['latency']['p50_ms'])} / {num(fx['latency']['p99_ms'])}"
                     + ("" if fx["sustainable"] else f" (not sustainable: {fx['verdict']})"),
                     num(fx["server"]["mean_batch_size"]), num(fx["server"]["mean_engine_ms_per_batch"]),
                     pct(fx["server"]["engine_busy_fraction"] or 0), *(num(fx["cpu"][k], 2) for k in (
                         "server_cores", "bench_cores", "foreign_cores")),
                     " / ".join(pct(x / tot) for x in fx["per_worker_items"])])
    return "\n".join([
        "## Throughput against `--workers N` (`python -m bench.workers_scale`)", "",
        "Each configuration is `python -m server --workers N --intra-op-threads T --engine-lanes 1 --cache-bytes 0` "
        f"or, as 'default', without thread and lane flags (fp32, pinned), on {cores} usable cores; throughput is a "
        f"ratio of the raw engine limit (fp32, batch {eng['batch_size']}, {eng['arrangement']}, median of "
        f"{eng['rounds']} rounds) measured in the same run.", "",
        f"{machine_line(m)} CPU features: {', '.join(m['cpu_features']) or 'no AVX-512/AMX'}; run time "
        f"{r['elapsed_s'] / 60:.1f} min.", "",
        f"**Method.** Open-loop Poisson load (`loadtest.openloop`, latency from the scheduled send) in steps of "
        f"{a['step_s']:g} s: the grid {sorted({*a['fractions'], fx_frac})} × the limit, then {a['refine']} bisection "
        "steps (`bench.kit.rates.search`). SO_REUSEPORT balances connections, not calls: the generator opens "
        f"connections until each worker holds {a['connections_per_worker']} (checked on each worker's `/metrics`) and "
        "sends calls round-robin over them. Sustainable = no failures, achieved ≥ 95% of offered, p99 ≤ "
        f"{a['p99_bound_ms']:g} ms. Server CPU: the workers' processes; generator: this process; foreign: the rest. "
        "Engine busy: engine time per lane-second, all workers' lanes. N × T: N workers, one batch of T threads at a "
        f"time each; 'default': each worker gets its share of the {dflt} cores as one-thread lanes."
        + (f" Skipped as duplicates: {', '.join(r['skipped'])}." if r["skipped"] else ""), "",
        *table(["workers × threads", "total threads", "max sustained/s", "× limit", "× 1 worker", "most completed/s",
                f"p50 / p99 ms at {fx_frac:.0%} ({fx_frac * limit:.0f}/s)", "mean batch there", "ms per batch there",
                "engine busy there", "server CPU there", "generator CPU", "foreign CPU", "calls per worker"], rows,
               "l" + "r" * 12 + "l"), "",
        "![workers](docs/bench/workers_scale.png)", "",
        *verdicts(runs, cores), "",
        "Reproduce: `python -m bench.workers_scale --model-repo model_repo --out bench_out` (results: "
        "`bench_out/workers_scale/results.json`)."]) + "\n"

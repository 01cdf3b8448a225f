"""python -m bench.workers_scale --model-repo model_repo --out bench_out [--quick]

Throughput against `--workers N` on this machine: for each configuration (N workers × T intra-op threads
per worker), the max sustained throughput (result cache off) under open-loop Poisson load, and p99 at
one fixed load, all against the raw engine limit measured in the same run.

SO_REUSEPORT spreads *connections* over the workers, not calls, and one gRPC channel is one connection;
the load generator therefore opens connections until each worker holds the same number (it asks each
worker's /metrics which one answered) and sends the calls round-robin over them: every worker gets the
same share, as behind a load balancer with many clients.

Writes <out>/workers_scale/results.json and workers_scale.png, and its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.cache_zipf import (
    ModelData,
    Step,
    engine_limit,
    exit_on_sigterm,
    fmt,
    fraction_sweep,
    load_model_data,
    machine_table,
    start_server,
    stop_all,
    sweep_outcome,
    write_docs,
)
from bench.kit.data import DEFAULT_DATA, REPO_ROOT
from bench.kit.machine import CpuMonitor, machine_info, process_cpu_seconds
from bench.kit.rates import SweepConfig, run_step
from bench.kit.server import ServerProcess, ServerSpec, metric_sum, server_flags
from loadtest.openloop import SCORE_METHOD, LoadConfig, run_open_loop
from scoring.v1 import scoring_pb2
from server.resources import cpu_limit

NAME = "workers_scale"
PV = "model_pv_total"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{NAME} {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def configs(text: str) -> list[tuple[int, int]]:
    """'1:2,2:1,2:0' -> [(workers, threads per worker)]; 0 threads = the server's default."""
    out = []
    for part in text.split(","):
        if part.strip():
            n, _, t = part.partition(":")
            out.append((int(n), int(t or 0)))
    return out








class SpreadChannel:
    """What run_open_loop uses of a channel (`unary_unary`), spreading the calls over several connections in
    turn."""

    def __init__(self, channels: Sequence[grpc.aio.Channel]) -> None:
        self.channels = list(channels)

    def unary_unary(self, method: str, request_serializer: Any = None,
                    response_deserializer: Any = None) -> Callable[..., Any]:
        calls = itertools.cycle([ch.unary_unary(method, request_serializer=request_serializer,
                                                response_deserializer=response_deserializer)
                                 for ch in self.channels])

        def call(request: Any, **kwargs: Any) -> Any:
            return next(calls)(request, **kwargs)

        return call


async def balanced_channels(group: ServerProcess, per_worker: int, body: bytes, timeout_s: float
                            ) -> tuple[list[grpc.aio.Channel], list[int]]:
    """Opens connections until every worker holds `per_worker` of them (or 30 tries per wanted one)."""
    held: dict[int, list[grpc.aio.Channel]] = {i: [] for i in range(group.spec.workers)}
    for _ in range(30 * per_worker * group.spec.workers):
        if all(len(v) >= per_worker for v in held.values()):
            break
        # A local subchannel pool: this channel gets its own TCP connection, not a shared one.
        ch = grpc.aio.insecure_channel(group.target, options=[("grpc.use_local_subchannel_pool", 1)])
        before = [metric_sum(v, PV) for v in await asyncio.to_thread(group.scrape_each)]
        call = ch.unary_unary(SCORE_METHOD, request_serializer=None, response_deserializer=None)
        await call(body, timeout=timeout_s)
        after = [metric_sum(v, PV) for v in await asyncio.to_thread(group.scrape_each)]
        worker = max(range(group.spec.workers), key=lambda i: after[i] - before[i])
        if len(held[worker]) < per_worker:
            held[worker].append(ch)
        else:
            await ch.close()
    counts = [len(v) for v in held.values()]
    # Interleaved, so round-robin alternates workers call by call.
    ordered = [ch for group_ in itertools.zip_longest(*held.values()) for ch in group_ if ch is not None]
    return ordered, counts


async def run_config(args: argparse.Namespace, data: ModelData, limit: float, requests: list[bytes],
                     workers: int, threads: int) -> dict[str, Any]:
    label = f"{workers} worker(s) × {threads or 'default'} thread(s)"
    # T threads: each worker runs one batch of T threads at a time; default: the server's own choice
    # (each worker gets its share of the cores as single-threaded lanes).
    exact = ["--intra-op-threads", str(threads), "--engine-lanes", "1"] if threads else []
    flags = server_flags(threads=None, pin=(args.model, data.manifest.version), extra=exact)
    log_path = args.out / NAME / f"server-{workers}w-{threads or 'default'}t.log"
    group = ServerProcess(ServerSpec(args.model_repo, args.server_cwd, flags, log_path, workers=workers))
    grid = sorted({*args.fractions, args.fixed_fraction})
    cfg = SweepConfig(limit=limit, fractions=grid, step_s=args.step_s, timeout_s=args.timeout_s,
                      p99_bound_ms=args.p99_bound_ms)
    try:
        await start_server(group)
        pids = group.worker_pids()
        log(f"{label}: {workers} worker(s) up in {group.start_seconds:.1f} s (pids {pids})")
        channels, counts = await balanced_channels(group, args.connections_per_worker, requests[0], args.timeout_s)
        log(f"  connections per worker: {counts}")
        spread = cast(grpc.aio.Channel, SpreadChannel(channels))  # duck-typed: run_open_loop calls unary_unary

        async def measure(fraction: float) -> Step:
            monitor = CpuMonitor()  # this process and the machine; the workers are summed below
            before_w = await asyncio.to_thread(group.scrape_each)
            cpu0 = sum(process_cpu_seconds(p) for p in pids)
            monitor.start()
            step = await run_step(group, spread, requests, fraction, cfg, None, lambda _m: None, label)
            own = monitor.stop()
            server_cores = (sum(process_cpu_seconds(p) for p in pids) - cpu0) / own["wall_s"]
            after_w = await asyncio.to_thread(group.scrape_each)
            step["cpu"] = {**own, "server_cores": round(server_cores, 3), "server_event_loop_cores": None,
                           "foreign_cores": round(max(own["machine_cores"] - own["bench_cores"] - server_cores,
                                                      0.0), 3)}
            step["per_worker_items"] = [metric_sum(a, PV) - metric_sum(b, PV)
                                        for a, b in zip(after_w, before_w, strict=True)]
            lat = step["latency"]
            log(f"  {label} {fraction:>5.0%} of limit: offered {step['offered_rate']:7.1f}/s achieved "
                f"{step['achieved_rate']:7.1f}/s p99 {fmt(lat['p99_ms'])} ms batch {step['server']['mean_batch_size']}"
                f" per worker {[int(x) for x in step['per_worker_items']]} server {server_cores:.2f} cores "
                f"generator {own['bench_cores']:.2f} foreign {step['cpu']['foreign_cores']:.2f} -> "
                f"{'OK' if step['sustainable'] else step['verdict']}")
            return step

        try:
            await run_open_loop(spread, requests, LoadConfig(rate=max(2.0, 0.2 * limit), duration_s=3.0,
                                                             timeout_s=args.timeout_s))
            steps = await fraction_sweep(measure, grid, args.refine, args.max_fraction)
        finally:
            for ch in channels:
                await ch.close()
    finally:
        await asyncio.to_thread(group.stop)
    fixed = next(s for s in steps if abs(s["fraction"] - args.fixed_fraction) < 1e-9)
    return {"workers": workers, "threads_per_worker": threads or 1, "threads_flag": threads,
            "lanes_per_worker": 1 if threads else max(1, cpu_limit() // workers),
            "total_threads": workers * (threads or max(1, cpu_limit() // workers)), "connections_per_worker": counts,
            "start_seconds": round(group.start_seconds, 1), "command": group.command, "steps": steps,
            **sweep_outcome(steps, limit), "fixed_load_step": fixed}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.workers_scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repo", type=Path, default=Path("model_repo"))
    ap.add_argument("--model", default="demo")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="results go to <out>/workers_scale/")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL query/title pairs [%(default)s]")
    ap.add_argument("--configs", type=configs, default=configs("1:0,1:2,2:1,2:0,3:1"),
                    help="workers:threads-per-worker, comma-separated (threads 0 = the server's default: each "
                         "worker gets its share of the cores as one-thread lanes; a configuration equal to an "
                         "earlier one is skipped; the first is the baseline) [1:0,1:2,2:1,2:0,3:1]")
    ap.add_argument("--fixed-fraction", type=float, default=0.6,
                    help="the fixed load (fraction of the engine limit) every configuration's p99 is read at")
    ap.add_argument("--fractions", type=floats, default=[0.9], help="more grid steps (fractions of the limit)")
    ap.add_argument("--refine", type=int, default=2, help="bisection steps after the grid")
    ap.add_argument("--max-fraction", type=float, default=3.0)
    ap.add_argument("--step-s", type=float, default=8.0)
    ap.add_argument("--connections-per-worker", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=5.0)
    ap.add_argument("--p99-bound-ms", type=float, default=1000.0)
    ap.add_argument("--engine-threads", type=int, default=0,
                    help="threads per run of the raw engine limit (0 = the server's CPU default: one-thread lanes)")
    ap.add_argument("--batch-sizes", type=floats, default=[1, 8, 16, 32])
    ap.add_argument("--engine-rounds", type=int, default=2)
    ap.add_argument("--engine-min-s", type=float, default=1.5)
    ap.add_argument("--server-cwd", type=Path, default=REPO_ROOT)
    ap.add_argument("--quick", action="store_true", help="smoke run (~2 minutes); numbers are rough")
    ap.add_argument("--benchmarks-md", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    ap.add_argument("--docs-dir", type=Path, default=REPO_ROOT / "docs" / "bench")
    ap.add_argument("--no-docs", action="store_true", help="leave BENCHMARKS.md and docs/bench/ alone")
    ap.add_argument("--from-results", type=Path, default=None, metavar="RESULTS_JSON",
                    help="measure nothing: rewrite the plot, summary and BENCHMARKS.md section from a results.json")
    args = ap.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes]
    if args.quick:
        args.configs, args.fractions, args.refine, args.step_s = configs("1:0,1:2,2:1"), [1.0], 0, 4.0
        args.batch_sizes, args.engine_rounds, args.engine_min_s = [8, 16], 1, 0.8
    return args


def plot(results: dict[str, Any], path: Path) -> Path:
    limit = results["engine"]["limit"]
    runs = results["configs"]
    labels = [f"{r['workers']} × {r['threads_per_worker']}t" for r in runs]
    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    xs = range(len(runs))
    ax_tp.bar(xs, [r["max_sustained_rate"] for r in runs], color="tab:blue", label="max sustained")
    ax_tp.plot(xs, [r["saturation_rate"] for r in runs], "kx", label="most completed/s (any step)")
    ax_tp.axhline(limit, color="black", ls="--", lw=1, label=f"raw engine limit ({limit:.0f}/s)")
    ax_tp.set_ylabel("requests / s")
    ax_tp.set_title("Max sustained throughput (cache off)", fontsize=10)
    fixed = results["args"]["fixed_fraction"]
    p99 = [r["fixed_load_step"]["latency"]["p99_ms"] or 0.0 for r in runs]
    p50 = [r["fixed_load_step"]["latency"]["p50_ms"] or 0.0 for r in runs]
    ax_lat.bar([x - 0.2 for x in xs], p50, width=0.4, color="tab:green", label="p50")
    ax_lat.bar([x + 0.2 for x in xs], p99, width=0.4, color="tab:red", label="p99")
    ax_lat.set_ylabel("ms")
    ax_lat.set_title(f"Latency at a fixed load: {fixed:.0%} of the limit ({fixed * limit:.0f}/s)", fontsize=10)
    for ax in (ax_tp, ax_lat):
        ax.set_xticks(list(xs), labels)
        ax.set_xlabel("workers × intra-op threads per worker")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def shape(run: dict[str, Any], default_lanes: int) -> str:
    """'2 × 1' (workers × threads per run, one run at a time) or '1 × 2 lanes × 1 (default)'."""
    if run["threads_flag"]:
        return f"{run['workers']} × {run['threads_per_worker']}"
    return f"{run['workers']} × {run.get('lanes_per_worker', default_lanes)} lanes × 1 (default)"


def interpretation(runs: Sequence[dict[str, Any]], cores: int, best_batch: int) -> list[str]:
    """Sentences that follow the measured numbers (whichever way they went)."""
    base = runs[0]
    # Max sustained is the headline; when a configuration sustained nothing, compare what it completed.
    key = "max_sustained_rate" if all(r["max_sustained_rate"] > 0 for r in runs) else "saturation_rate"
    what = "max sustained rate" if key == "max_sustained_rate" else "completions per second"
    note = "" if key == "max_sustained_rate" else " (some configuration sustained no step: most completed per second)"
    out = [f"- {what.capitalize()}{note}: " + "; ".join(f"{shape(r, cores)} {r[key]:.1f}/s" for r in runs) + "."]
    multi = [r for r in runs if r["workers"] > 1]
    if not multi or base[key] <= 0:
        return out
    best = max(multi, key=lambda r: r[key])
    gain = best[key] / base[key]
    verdict = ("about the same as" if 0.95 <= gain <= 1.05 else "more than" if gain > 1.05 else "less than")
    out.append(f"- The best multi-worker configuration ({shape(best, cores)}) did {gain:.2f} × the {what} of "
               f"{shape(base, cores)}: {verdict} one worker.")
    out.append(
        f"- Why: on {cores} cores more workers cannot add compute. One worker's engine already keeps every core "
        f"busy ({shape(base, cores)}), and the engine is where the CPU goes "
        f"(server CPU at the fixed load: {base['fixed_load_step']['cpu']['server_cores']:.2f} cores for one "
        "worker). Workers only change how the same cores are shared: each worker has its own event loop (gRPC, "
        "decoding and tokenizing run in parallel rather than on one Python thread, which helps only if the event "
        "loop is the bottleneck), each batches only its share of the traffic (smaller batches at the same load, "
        f"while the raw engine does best at batch {best_batch}); one-thread runs side by side, as lanes of one "
        "worker or as workers, need no synchronisation inside a batch, but each batch takes longer than one "
        "split over every core. At the fixed load: " + "; ".join(
            f"{shape(r, cores)}: batches of {fmt(fx['mean_batch_size'])} items, "
            f"{fmt(fx['mean_engine_ms_per_batch'])} ms each"
            for r in runs if (fx := r["fixed_load_step"]["server"]) is not None)
        + ". More threads than cores in total (workers × threads > "
        f"{cores}) makes them take turns on the cores and a parallel section waits for its slowest thread.")
    out.append("- `--workers N` is for machines with more cores than one engine uses well, or a Python-bound event "
               f"loop; on this {cores}-core machine the default (1 worker running one single-threaded batch per core) "
               "is the one to run"
               + (", unless a multi-worker row above is clearly ahead" if gain > 1.05 else "") + ".")
    return out


def markdown(results: dict[str, Any]) -> str:
    r, a, eng = results, results["args"], results["engine"]
    limit, cores = eng["limit"], r["machine"]["usable_cpus"]
    runs = r["configs"]
    base = runs[0]
    dflt = r.get("default_threads", cpu_limit())  # the server's --intra-op-threads 0 on the measured machine
    lines: list[str] = [
        "## Throughput against `--workers N` (`python -m bench.workers_scale`)",
        "",
        f"Each configuration is `python -m server --workers N --intra-op-threads T --engine-lanes 1 "
        "--cache-bytes 0` or, as 'default', without thread and lane flags (fp32, "
        f"pinned), on a machine with {cores} usable cores; throughput is a ratio of the raw engine limit "
        f"(fp32, batch {eng['batch_size']}, {eng['threads']} threads, median of {eng['rounds']} rounds) "
        "measured in the same run.",
        "",
        *machine_table(r["machine"], r["elapsed_s"]),
        "",
        "Reproduce: `python -m bench.workers_scale --model-repo model_repo --out bench_out` "
        f"(results: `bench_out/{NAME}/results.json`).",
        "",
        "**Method.** Open-loop Poisson load (`loadtest.openloop`, latency from the scheduled send) in "
        f"steps of {a['step_s']:g} s: the grid {sorted({*a['fractions'], a['fixed_fraction']})} × the limit, "
        f"then {a['refine']} bisection steps (`bench.kit.rates.run_step` and `next_fraction`). SO_REUSEPORT "
        "balances connections, not calls: the generator opens connections until each worker holds "
        f"{a['connections_per_worker']} (checked on each worker's `/metrics`) and sends calls round-robin over "
        "them, so each worker gets the same share. Sustainable = no failures, achieved ≥ 95% of offered, p99 ≤ "
        f"{a['p99_bound_ms']:g} ms. Server CPU sums the workers' processes; generator = this process; foreign = "
        "everything else on the machine. Engine busy sums the workers' engine time (2 workers each busy all the "
        "time = 200%). N × T: N workers, each running one batch of T threads at a time; 'default': the "
        f"server's own choice, each worker gets its share of the {dflt} usable cores as one-thread lanes."
        + (f" Skipped as duplicates of an earlier configuration: {r['skipped']}."
                                    if r["skipped"] else ""),
        "",
        "| workers × threads | total threads | max sustained/s | × limit | × 1 worker | most completed/s "
        f"| p50 / p99 ms at {a['fixed_fraction']:.0%} ({a['fixed_fraction'] * limit:.0f}/s) | mean batch there | "
        "engine busy there | server CPU there | generator CPU | foreign CPU | calls per worker |",
        "| --- |" + " ---: |" * 11 + " --- |",
    ]
    for run in runs:
        fx = run["fixed_load_step"]
        share = fx["per_worker_items"]
        tot = sum(share) or 1.0
        lines.append(
            f"| {shape(run, dflt)} | "
            f"{run['total_threads']} | {run['max_sustained_rate']:.1f} | {run['max_sustained_ratio']:.2f} | "
            f"{fmt(run['max_sustained_rate'] / b if (b := base['max_sustained_rate']) else None, 2)} | "
            f"{run['saturation_rate']:.1f} | "
            f"{fmt(fx['latency']['p50_ms'])} / {fmt(fx['latency']['p99_ms'])}"
            f"{'' if fx['sustainable'] else ' (not sustainable: ' + fx['verdict'] + ')'} | "
            f"{fmt(fx['server']['mean_batch_size'])} | {(fx['server']['engine_busy_fraction'] or 0):.0%} | "
            f"{fx['cpu']['server_cores']:.2f} | {fx['cpu']['bench_cores']:.2f} | {fx['cpu']['foreign_cores']:.2f} | "
            + " / ".join(f"{x / tot:.0%}" for x in share) + " |")
    lines += ["", f"![workers](docs/bench/{NAME}.png)", "", "**What the numbers say.**", ""]
    lines += interpretation(runs, cores, eng["batch_size"])
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    try:
        return run(args)
    finally:
        stop_all()


def run(args: argparse.Namespace) -> int:
    out_dir = args.out / NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.from_results is not None:
        write_outputs(args, json.loads(args.from_results.read_text()))
        return 0
    results: dict[str, Any] = {"machine": machine_info(REPO_ROOT)}
    m = results["machine"]
    log(f"{m['cpu_model']}, {m['usable_cpus']} CPUs, code {m['git']}, load average {' '.join(m['loadavg_at_start'])}")
    data = load_model_data(args.model_repo, args.model, args.data)
    requests = [scoring_pb2.ScoreRequest(query=p.query, title=p.title or None).SerializeToString()
                for p in data.pairs]
    results["data"] = {"source": data.source, "distinct_inputs": len(data.pairs)}
    log(f"raw engine: fp32, batch sizes {args.batch_sizes}, {args.engine_rounds} round(s) of ≥ {args.engine_min_s} s")
    results["engine"] = engine_limit(data, args.engine_threads, args.batch_sizes, args.engine_rounds,
                                     args.engine_min_s, log)
    limit = results["engine"]["limit"]
    log(f"  limit {limit:.1f}/s at batch {results['engine']['batch_size']}")
    seen: set[tuple[int, int]] = set()
    runs, skipped = [], []
    for workers, threads in args.configs:
        lanes = max(1, cpu_limit() // workers)  # the default's one-thread lanes per worker
        effective = (workers, threads) if threads else (workers, 1 if lanes == 1 else -lanes)
        if effective in seen:
            skipped.append(f"{workers}:{threads}")
            continue
        seen.add(effective)
        runs.append(asyncio.run(run_config(args, data, limit, requests, workers, threads)))
    results["configs"], results["skipped"], results["default_threads"] = runs, skipped, cpu_limit()
    results["elapsed_s"] = round(time.perf_counter() - T0, 1)
    results["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_outputs(args, results)
    log(f"done in {results['elapsed_s']:.0f} s; results in {out_dir}/")
    return 0


def write_outputs(args: argparse.Namespace, results: dict[str, Any]) -> None:
    out_dir = args.out / NAME
    png = plot(results, out_dir / f"{NAME}.png")
    md = markdown(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    (out_dir / "summary.md").write_text(md)
    print(md)
    if not args.no_docs:
        write_docs(NAME, md, png, args.benchmarks_md, args.docs_dir)


if __name__ == "__main__":
    raise SystemExit(main())

"""python -m bench --model-repo model_repo --out bench_out

Measures, in one run: the demo model build, int8 agreement with fp32, the raw ONNX Runtime throughput by
batch size, and the server under open-loop Poisson load (batching on and off), each server number as a
ratio of the raw engine measured in the same run. Writes results.json, summary.md and PNG plots into
--out, prints the summary, and rewrites BENCHMARKS.md (plots copied into docs/bench/).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.build import time_build
from bench.docs import benchmarks_md, merge_into
from bench.kit.data import DEFAULT_DATA, REPO_ROOT, load_pairs
from bench.kit.engine import (
    Engine,
    agreement,
    arrangement,
    describe,
    load_engine,
    make_workload,
    probe,
    throughput_sweep,
)
from bench.kit.machine import machine_info
from bench.kit.rates import SweepConfig, run_step, sweep
from bench.kit.server import ServerProcess, ServerSpec, server_flags
from bench.plots import SERVER_PNG, THROUGHPUT_PNG, plot_server, plot_throughput
from bench.report import headline_rows, overhead_analysis, summary_markdown
from loadtest.openloop import LoadConfig, run_open_loop, serialize_requests
from model_format.features import EncodedRequest, FeatureEncoder, FeatureError
from model_format.repository import latest_complete, scan_model
from scoring.v1 import scoring_pb2

STEPS = ("build", "agreement", "engine", "server", "what-if", "unbatched")
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repo", type=Path, default=Path("model_repo"), help="repository with the demo model")
    ap.add_argument("--model", default="demo", help="model to measure (its newest complete version)")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="JSONL query/title pairs (synthetic pairs when absent) [default: %(default)s]")
    ap.add_argument("--threads", type=int, default=0,
                    help="ORT threads per run, offline and in the server (0 = the server's CPU default: one "
                         "thread per run, one run at a time per core)")
    ap.add_argument("--batch-sizes", type=ints, default=[1, 8, 16, 32, 64])
    ap.add_argument("--agreement-pairs", type=int, default=1000)
    ap.add_argument("--engine-rounds", type=int, default=3, help="interleaved rounds per configuration")
    ap.add_argument("--engine-min-s", type=float, default=2.0, help="seconds per configuration per round")
    ap.add_argument("--fractions", type=floats, default=[0.5, 0.7, 0.8, 0.9, 1.0, 1.1],
                    help="server steps, as fractions of the raw engine's best fp32 throughput")
    ap.add_argument("--unbatched-fractions", type=floats, default=[0.5, 0.8, 1.1],
                    help="--max-batch-size 1 steps, as fractions of the raw fp32 batch-1 throughput")
    ap.add_argument("--step-s", type=float, default=15.0, help="seconds per server step (batching on)")
    ap.add_argument("--unbatched-step-s", type=float, default=10.0, help="seconds per step (batching off)")
    ap.add_argument("--timeout-s", type=float, default=5.0, help="gRPC deadline of every call")
    ap.add_argument("--p99-bound-ms", type=float, default=1000.0, help="a step with a higher p99 is not sustainable")
    ap.add_argument("--refine", type=int, default=3, help="bisection (or extension) steps after the grid")
    ap.add_argument("--max-reruns", type=int, default=2,
                    help="per sweep: steps run again because other processes used > 0.3 cores meanwhile")
    ap.add_argument("--probe-s", type=float, default=2.0, help="raw-engine re-measure before each step (0 = off)")
    ap.add_argument("--what-if", default="--max-batch-size 16;--intra-op-threads 2 --engine-lanes 1",
                    help="';'-separated server flag sets, each run at the --what-if-fractions ('' = none)")
    ap.add_argument("--what-if-fractions", type=floats, default=[0.5, 1.0])
    ap.add_argument("--what-if-step-s", type=float, default=10.0)
    ap.add_argument("--server-cwd", type=Path, default=REPO_ROOT,
                    help="checkout whose `server` package is run (to compare commits on the same limit)")
    ap.add_argument("--skip", default="", help=f"comma-separated steps to leave out: {', '.join(STEPS)}")
    ap.add_argument("--quick", action="store_true", help="short smoke run (minutes); numbers are rough")
    ap.add_argument("--benchmarks-md", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    ap.add_argument("--docs-dir", type=Path, default=REPO_ROOT / "docs" / "bench")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite BENCHMARKS.md and docs/bench/")
    ap.add_argument("--from-results", type=Path, default=None, metavar="RESULTS_JSON",
                    help="measure nothing: rewrite the summary, plots and BENCHMARKS.md from a saved results.json")
    args = ap.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - set(STEPS)
    if unknown:
        ap.error(f"unknown --skip steps: {sorted(unknown)}")
    if args.quick:
        args.engine_rounds, args.engine_min_s, args.agreement_pairs = 1, 0.8, 200
        args.fractions, args.unbatched_fractions = [0.5, 1.0], [0.5, 1.0]
        args.step_s, args.unbatched_step_s, args.refine, args.probe_s, args.max_reruns = 5.0, 4.0, 0, 0.5, 0
        args.what_if_step_s = 4.0
    return args


def data_stats(items: list[EncodedRequest]) -> dict[str, float]:
    lengths = np.array([it.length for it in items])
    return {"tokens_mean": float(lengths.mean()), "tokens_p50": float(np.percentile(lengths, 50)),
            "tokens_p99": float(np.percentile(lengths, 99)), "tokens_max": int(lengths.max())}




async def server_phase(args: argparse.Namespace, results: dict[str, Any], requests: list[bytes], version: int,
                       fp32: Engine, probe_items: list[EncodedRequest]) -> None:
    engine = results["engine"]
    limit = engine["best"]["fp32"]["samples_per_s"]
    best_bs = engine["best"]["fp32"]["batch_size"]
    batch1 = engine["grouped"]["fp32"].get("1", {}).get("samples_per_s", limit)
    work = make_workload("probe", probe_items, best_bs, True, seed=5)

    def probe_fn() -> float:
        return probe(fp32, work, args.probe_s)

    flags = server_flags(threads=args.threads, pin=(args.model, version))
    results["server_flags"] = flags
    cfg = SweepConfig(limit=limit, fractions=args.fractions, step_s=args.step_s, timeout_s=args.timeout_s,
                      p99_bound_ms=args.p99_bound_ms, refine=args.refine, max_reruns=args.max_reruns)

    def spec(label: str, extra: list[str]) -> ServerSpec:
        return ServerSpec(args.model_repo, args.server_cwd, [*flags, *extra], args.out / f"server-{label}.log")

    probe_or_none = probe_fn if args.probe_s > 0 else None
    if "server" not in args.skip:
        log(f"server, batching on: steps of {args.step_s:.0f} s at {args.fractions} × {limit:.1f}/s")
        server = ServerProcess(spec("batched", []))
        await asyncio.to_thread(server.start)
        try:
            log(f"  server up in {server.start_seconds:.1f} s (pid {server.pid})")
            out = await sweep(server, requests, cfg, label="batched", probe=probe_or_none, progress=log)
        finally:
            await asyncio.to_thread(server.stop)
        results["server_batched"] = {**out, "limit_name": "raw engine best fp32", "command": server.command}

    what_ifs = [w.strip() for w in args.what_if.split(";") if w.strip()] if "what-if" not in args.skip else []
    if what_ifs:
        keys = ("fraction", "offered_rate", "achieved_rate", "latency", "server", "failures", "cpu",
                "engine_probe_before", "sustainable")
        rows = []
        base = results.get("server_batched")
        for f in args.what_if_fractions:
            same = next((s for s in base["steps"] if abs(s["fraction"] - f) < 1e-6), None) if base else None
            if same is not None:
                rows.append({"flags": "", **{k: same[k] for k in keys}})
        wcfg = SweepConfig(limit=limit, fractions=args.what_if_fractions, step_s=args.what_if_step_s,
                           timeout_s=args.timeout_s, p99_bound_ms=args.p99_bound_ms, refine=0)
        for i, extra in enumerate(what_ifs):
            log(f"server variant `{extra}`: steps of {args.what_if_step_s:.0f} s at {args.what_if_fractions} × "
                f"{limit:.1f}/s")
            server = ServerProcess(spec(f"what-if-{i}", extra.split()))
            await asyncio.to_thread(server.start)
            try:
                async with grpc.aio.insecure_channel(server.target) as channel:
                    await run_open_loop(channel, requests, LoadConfig(rate=max(2.0, 0.2 * limit), duration_s=3.0,
                                                                      timeout_s=args.timeout_s))
                    for f in args.what_if_fractions:
                        step = await run_step(server, channel, requests, f, wcfg, probe_or_none, log, "variant")
                        rows.append({"flags": extra, **{k: step[k] for k in keys}})
            finally:
                await asyncio.to_thread(server.stop)
        results["server_what_if"] = rows

    if "unbatched" not in args.skip:
        ucfg = SweepConfig(limit=batch1, fractions=args.unbatched_fractions, step_s=args.unbatched_step_s,
                           timeout_s=args.timeout_s, p99_bound_ms=args.p99_bound_ms, refine=args.refine,
                           max_reruns=args.max_reruns)
        log(f"server, batching off: steps of {args.unbatched_step_s:.0f} s at {args.unbatched_fractions} × "
            f"{batch1:.1f}/s (raw batch 1)")
        server = ServerProcess(spec("unbatched", ["--max-batch-size", "1"]))
        await asyncio.to_thread(server.start)
        try:
            log(f"  server up in {server.start_seconds:.1f} s (pid {server.pid})")
            out = await sweep(server, requests, ucfg, label="unbatched", probe=probe_or_none, progress=log)
        finally:
            await asyncio.to_thread(server.stop)
        results["server_unbatched"] = {**out, "limit_name": "raw engine fp32 at batch 1", "command": server.command}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_results is not None:
        saved: dict[str, Any] = json.loads(args.from_results.read_text())
        args.p99_bound_ms = saved["args"]["p99_bound_ms"]
        args.timeout_s = saved["args"]["timeout_s"]
        if "server_batched" in saved:
            saved["analysis"] = overhead_analysis(saved["engine"], saved["server_batched"],
                                                  saved.get("server_unbatched"))
        saved["headline"] = {"rows": headline_rows(saved)}
        write_outputs(args, saved)
        return 0
    results: dict[str, Any] = {"machine": machine_info(REPO_ROOT)}
    m = results["machine"]
    log(f"{m['cpu_model']}, {m['usable_cpus']} CPUs, onnxruntime {m['onnxruntime']}, code {m['git']}, "
        f"load average {' '.join(m['loadavg_at_start'])}")

    found = latest_complete(scan_model(args.model_repo, args.model, verify_checksums=False))
    if found is None or found.manifest is None:
        print(f"no complete version of {args.model} in {args.model_repo}; run `make demo` first", file=sys.stderr)
        return 2
    version_dir, manifest = found.path, found.manifest
    results["model"] = {"name": manifest.model, "version": manifest.version, "heads": len(manifest.heads),
                        "precisions": sorted(manifest.precisions), "max_seq_len": manifest.max_seq_len}

    pairs = load_pairs(args.data)
    encoder = FeatureEncoder(version_dir, manifest)
    items: list[EncodedRequest] = []
    kept = []
    for p in pairs.pairs:
        try:
            items.append(encoder.encode(p.query, p.title or None))
            kept.append(p)
        except FeatureError:
            continue
    results["data"] = {"source": pairs.source if pairs.real else "synthetic (the real pairs file is absent)",
                       "real": pairs.real, "pairs": len(items), **data_stats(items)}
    log(f"data: {results['data']['source']}: {len(items)} pairs, tokens mean {results['data']['tokens_mean']:.1f}, "
        f"p99 {results['data']['tokens_p99']:.0f}")

    if "build" not in args.skip:
        log("model build: python -m tools.build_model --demo --precision int8 (temporary folder)")
        results["build"] = time_build(version_dir)
        b = results["build"]
        log(f"  {'built' if b['ok'] else 'FAILED'} in {b['seconds']:.1f} s {b.get('file_mib', '')}")

    engines: dict[str, Engine] = {p: load_engine(version_dir, manifest, p, *arrangement(args.threads))
                                  for p in ("fp32", "int8") if p in manifest.precisions}
    log("sessions loaded: " + ", ".join(f"{p} {e.load_seconds:.1f} s" for p, e in engines.items()))
    rng = random.Random(3)
    if "agreement" not in args.skip and "int8" in engines:
        subset = rng.sample(items, min(args.agreement_pairs, len(items)))
        tol = manifest.golden.tolerance.get("int8") if manifest.golden else None
        log(f"int8 vs fp32 agreement on {len(subset)} pairs")
        results["agreement"] = agreement(engines["fp32"], engines["int8"], subset, tol)
        a = results["agreement"]
        log(f"  Spearman min {a['spearman_min']:.4f} mean {a['spearman_mean']:.4f}, max abs diff "
            f"{a['max_abs_diff']:.4f}")

    need_engine = not {"server", "what-if", "unbatched"} <= args.skip
    if "engine" not in args.skip or need_engine:
        if "engine" in args.skip:
            log("raw engine: needed as the server's limit; measuring anyway")
        log(f"raw engine throughput: batch sizes {args.batch_sizes}, {args.engine_rounds} round(s) of "
            f"≥ {args.engine_min_s} s each")
        results["engine"] = throughput_sweep(engines, items, args.batch_sizes, rounds=args.engine_rounds,
                                             min_seconds=args.engine_min_s, progress=log)
        results["engine"]["threads"], results["engine"]["lanes"] = arrangement(args.threads)
        results["engine"]["arrangement"] = describe(args.threads)
        log("  best: " + "; ".join(f"{p} {v['samples_per_s']:.1f}/s at batch {v['batch_size']}"
                                   for p, v in results["engine"]["best"].items()))

    fp32 = engines["fp32"]
    del engines
    gc.collect()
    if need_engine:
        requests = serialize_requests([scoring_pb2.ScoreRequest(query=p.query, title=p.title or None)
                                       for p in kept])
        probe_items = rng.sample(items, min(512, len(items)))
        asyncio.run(server_phase(args, results, requests, manifest.version, fp32, probe_items))
        if "server_batched" in results:
            results["analysis"] = overhead_analysis(results["engine"], results["server_batched"],
                                                    results.get("server_unbatched"))

    results["headline"] = {"rows": headline_rows(results)}
    results["elapsed_s"] = round(time.perf_counter() - T0, 1)
    results["args"] = {k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
                       for k, v in vars(args).items()}
    write_outputs(args, results)
    log(f"done in {results['elapsed_s']:.0f} s; results in {args.out}/"
        + ("" if args.no_docs else f", {args.benchmarks_md.name} and {args.docs_dir}/"))
    return 0


def write_outputs(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, str]:
    plots: dict[str, str] = {}
    if "engine" in results:
        plot_throughput(results["engine"], args.out / THROUGHPUT_PNG)
        plots["Raw engine throughput by batch size"] = THROUGHPUT_PNG
    sweeps = {name: results[key] for key, name in (("server_batched", "batching on"),
                                                   ("server_unbatched", "batching off"))
              if key in results}
    if sweeps:
        plot_server(sweeps, results["engine"]["best"]["fp32"]["samples_per_s"], args.p99_bound_ms, args.timeout_s,
                    args.out / SERVER_PNG)
        plots["Server: achieved throughput and latency vs offered load"] = SERVER_PNG
    summary = summary_markdown(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    (args.out / "summary.md").write_text(summary)
    print()
    print(summary)
    if not args.no_docs:
        args.docs_dir.mkdir(parents=True, exist_ok=True)
        for name in plots.values():
            shutil.copyfile(args.out / name, args.docs_dir / name)
        existing = args.benchmarks_md.read_text() if args.benchmarks_md.exists() else ""
        args.benchmarks_md.write_text(merge_into(existing, benchmarks_md(results, summary, plots)))
    return plots


if __name__ == "__main__":
    raise SystemExit(main())

"""python -m bench --model-repo model_repo --out bench_out

Measures, in one run: the demo model build, int8 agreement with fp32, the raw ONNX Runtime throughput by batch
size, and the server under open-loop Poisson load (batching on and off, flag variants), each server number as a
ratio of the raw engine measured in the same run. Writes results.json, summary.md, the plots and the server logs
into --out, and its section of BENCHMARKS.md (plots copied into docs/bench/).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.kit import engine
from bench.kit.cli import add_model_args, add_publish_args, floats, logger, new_parser
from bench.kit.data import REPO_ROOT, newest_version
from bench.kit.machine import arrangement, describe, machine_info
from bench.kit.publish import publish
from bench.kit.rates import SweepConfig, sweep
from bench.kit.server import ServerSpec, server_flags, serving
from bench.reports import summary
from model_format.features import EncodedRequest
from model_format.manifest import read_manifest

STEPS = ("build", "agreement", "engine", "server", "what-if", "unbatched")
SERVER_STEPS = {"server", "what-if", "unbatched"}  # these need the raw engine as their limit
T0 = time.perf_counter()
log = logger("bench")



def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = new_parser("", __doc__)
    add_model_args(ap)
    ap.add_argument("--threads", type=int, default=0, help="ORT threads per run, offline and in the server "
                    "(0 = the server's CPU default: one thread per run, one run at a time per core)")
    ap.add_argument("--batch-sizes", type=floats, default=[1, 8, 16, 32, 64])
    ap.add_argument("--agreement-pairs", type=int, default=1000)
    ap.add_argument("--engine-rounds", type=int, default=3, help="interleaved rounds per configuration")
    ap.add_argument("--engine-min-s", type=float, default=2.0, help="seconds per configuration per round")
    ap.add_argument("--fractions", type=floats, default=[0.5, 0.7, 0.8, 0.9, 1.0, 1.1], help="server steps, as "
                    "fractions of the raw engine's best fp32 throughput")
    ap.add_argument("--step-s", type=float, default=15.0, help="seconds per server step (batching on)")
    ap.add_argument("--unbatched-fractions", type=floats, default=[0.5, 0.8, 1.1], help="--max-batch-size 1 "
                    "steps, as fractions of the raw fp32 batch-1 throughput")
    ap.add_argument("--unbatched-step-s", type=float, default=10.0, help="seconds per step (batching off)")
    ap.add_argument("--what-if", default="--max-batch-size 16;--intra-op-threads 2 --engine-lanes 1",
                    help="';'-separated server flag sets, each run at the --what-if-fractions ('' = none)")
    ap.add_argument("--what-if-fractions", type=floats, default=[0.5, 1.0])
    ap.add_argument("--what-if-step-s", type=float, default=10.0)
    ap.add_argument("--p99-bound-ms", type=float, default=1000.0, help="a step with a higher p99 is not sustainable")
    ap.add_argument("--refine", type=int, default=3, help="bisection (or extension) steps after the grid")
    ap.add_argument("--max-reruns", type=int, default=2, help="per sweep: steps run again (others used > 0.3 cores)")
    ap.add_argument("--probe-s", type=float, default=2.0, help="raw-engine re-measure before each step (0 = off)")
    ap.add_argument("--skip", default="", help=f"comma-separated steps to leave out: {', '.join(STEPS)}")
    ap.add_argument("--server-cwd", type=Path, default=REPO_ROOT,
                    help="checkout whose `server` package is run (it must know `bench.kit.server.server_flags`)")
    ap.add_argument("--quick", action="store_true", help="short smoke run (minutes); numbers are rough")
    add_publish_args(ap)
    args = ap.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if unknown := args.skip - set(STEPS):
        ap.error(f"unknown --skip steps: {sorted(unknown)}")
    if args.quick:
        args.engine_rounds, args.engine_min_s, args.agreement_pairs = 1, 0.8, 200
        args.fractions, args.unbatched_fractions = [0.5, 1.0], [0.5, 1.0]
        args.step_s, args.unbatched_step_s, args.refine, args.probe_s, args.max_reruns = 5.0, 4.0, 0, 0.5, 0
        args.what_if_step_s = 4.0
    return args


def time_build(reference: Path) -> dict[str, Any]:
    """The demo build into a temporary folder; it is seeded, so its checksums must equal `reference`'s."""
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "tools.build_model", "--demo", "--precision", "int8", "--out",
                               tmp], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        seconds = round(time.perf_counter() - t0, 2)
        if proc.returncode != 0:
            return {"ok": False, "seconds": seconds, "error": proc.stderr[-2000:]}
        built = next(Path(tmp, "demo").iterdir())
        sizes = {f.name: f.stat().st_size for f in (built / "model.onnx", built / "model.int8.onnx") if f.exists()}
        same = json.loads((built / "manifest.json").read_text()).get("sha256") == json.loads(
            (reference / "manifest.json").read_text()).get("sha256")
    return {"ok": True, "command": "python -m tools.build_model --demo --precision int8 --out <tmp>",
            "seconds": seconds, "file_bytes": sizes, "file_mib": {k: round(v / 2**20, 1) for k, v in sizes.items()},
            "int8_size_ratio": round(sizes["model.int8.onnx"] / sizes["model.onnx"], 3) if len(sizes) == 2 else None,
            "identical_to_measured_model": same}


async def server_phase(args: argparse.Namespace, results: dict[str, Any], requests: list[bytes], version: int,
                       fp32: engine.Engine, probe_items: list[EncodedRequest]) -> None:
    best = results["engine"]["best"]["fp32"]
    limit = best["samples_per_s"]
    batch1 = results["engine"]["grouped"]["fp32"].get("1", {}).get("samples_per_s", limit)
    work = engine.make_workload("probe", probe_items, best["batch_size"], True, seed=5)
    probe = functools.partial(engine.probe, fp32, work, args.probe_s) if args.probe_s > 0 else None
    flags = results["server_flags"] = server_flags(threads=args.threads, pin=(args.model, version))

    async def run_sweep(label: str, extra: list[str], fractions: list[float], step_s: float, refine: int,
                      rate: float) -> dict[str, Any]:
        log(f"server {label} {' '.join(extra)}: steps of {step_s:.0f} s at {fractions} × {rate:.1f}/s")
        cfg = SweepConfig(limit=rate, fractions=fractions, step_s=step_s, timeout_s=args.timeout_s,
                          p99_bound_ms=args.p99_bound_ms, refine=refine, max_reruns=args.max_reruns)
        spec = ServerSpec(args.model_repo, args.server_cwd, [*flags, *extra], args.out / f"server-{label}.log")
        async with serving(spec, log, f"  server {label}") as server:
            out = await sweep(server, requests, cfg, label=label, probe=probe, progress=log)
        return {**out, "command": server.command}

    if "server" not in args.skip:
        out = await run_sweep("batched", [], args.fractions, args.step_s, args.refine, limit)
        results["server_batched"] = {**out, "limit_name": "raw engine best fp32"}
    if "what-if" not in args.skip and (what_ifs := [w.strip() for w in args.what_if.split(";") if w.strip()]):
        base = results.get("server_batched", {}).get("steps", [])
        rows = [{"flags": "", **s} for f in args.what_if_fractions for s in base if abs(s["fraction"] - f) < 1e-6]
        for i, extra in enumerate(what_ifs):
            out = await run_sweep(f"what-if-{i}", extra.split(), args.what_if_fractions, args.what_if_step_s, 0, limit)
            rows += [{"flags": extra, **s} for s in out["steps"]]
        results["server_what_if"] = rows
    if "unbatched" not in args.skip:
        out = await run_sweep("unbatched", ["--max-batch-size", "1"], args.unbatched_fractions, args.unbatched_step_s,
                            args.refine, batch1)
        results["server_unbatched"] = {**out, "limit_name": "raw engine fp32 at batch 1"}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine_info(REPO_ROOT)}
    version_dir = newest_version(args.model_repo, args.model)
    manifest = read_manifest(version_dir)
    results["model"] = {"name": manifest.model, "version": manifest.version, "heads": len(manifest.heads),
                        "precisions": sorted(manifest.precisions), "max_seq_len": manifest.max_seq_len}
    data = engine.encode_pairs(version_dir, manifest, args.data)
    items, lengths = data.items, np.array([it.length for it in data.items])
    results["data"] = {"source": data.source, "real": data.real, "pairs": len(items), "tokens_mean": lengths.mean(),
                       "tokens_p50": np.percentile(lengths, 50), "tokens_p99": np.percentile(lengths, 99),
                       "tokens_max": lengths.max()}  # numpy numbers: publish.json_default writes them
    log(f"data: {data.source}: {len(items)} pairs, tokens mean {lengths.mean():.1f}")

    if "build" not in args.skip:
        log("model build: python -m tools.build_model --demo --precision int8 (temporary folder)")
        b = results["build"] = time_build(version_dir)
        log(f"  {'built' if b['ok'] else 'FAILED'} in {b['seconds']:.1f} s {b.get('file_mib', '')}")

    engines: dict[str, engine.Engine] = {p: engine.load_engine(version_dir, manifest, p, *arrangement(
        args.threads)) for p in ("fp32", "int8") if p in manifest.precisions}
    log("sessions loaded: " + ", ".join(f"{p} {e.load_seconds:.1f} s" for p, e in engines.items()))
    rng = random.Random(3)
    if "agreement" not in args.skip and "int8" in engines:
        subset = rng.sample(items, min(args.agreement_pairs, len(items)))
        log(f"int8 vs fp32 agreement on {len(subset)} pairs")
        results["agreement"] = engine.agreement(engines["fp32"], engines["int8"], subset,
                                                manifest.golden.tolerance.get("int8") if manifest.golden else None)

    serve = not args.skip >= SERVER_STEPS
    if "engine" not in args.skip or serve:
        log(f"raw engine throughput ({describe(args.threads)}): batch sizes {args.batch_sizes}, "
            f"{args.engine_rounds} round(s) of ≥ {args.engine_min_s} s each")
        e = results["engine"] = engine.throughput_sweep(engines, items, args.batch_sizes, rounds=args.engine_rounds,
                                                        min_seconds=args.engine_min_s, progress=log)
        e["threads"], e["lanes"] = arrangement(args.threads)
        e["arrangement"] = describe(args.threads)
    fp32 = engines.pop("fp32")
    engines.clear()  # the int8 session's memory back before the server starts
    gc.collect()
    if serve:
        asyncio.run(server_phase(args, results, data.requests, manifest.version, fp32,
                                 rng.sample(items, min(512, len(items)))))
    results["elapsed_s"] = round(time.perf_counter() - T0, 1)
    results["args"] = vars(args)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.from_results.read_text()) if args.from_results else measure(args)
    if (analysis := summary.analysis(results)) is not None:
        results["analysis"] = analysis
    results["headline"] = {"rows": summary.headline_rows(results)}
    pngs = summary.plots(results, args.out)
    publish(args, "", results, summary.markdown(results, [p.name for p in pngs]), pngs, log, args.out, "summary.md")
    log(f"done; results in {args.out}/" + ("" if args.no_docs else f", {args.benchmarks_md} and {args.docs_dir}/"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

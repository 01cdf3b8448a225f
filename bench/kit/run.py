"""What a scenario that holds its own servers to the raw engine shares (`bench.cache_zipf`, `bench.workers_scale`):
the common flags, the model and its distinct inputs, the raw engine limit, servers that never outlive the tool
(SIGTERM included), and the run from its header to `publish`."""

from __future__ import annotations

import argparse
import gc
import json
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.kit import server as server_kit
from bench.kit.cli import Progress, add_model_args, add_publish_args, ints, logger, new_parser
from bench.kit.data import REPO_ROOT, encodable, load_pairs, newest_version
from bench.kit.engine import load_engine, throughput_sweep
from bench.kit.machine import arrangement, describe, machine, machine_line
from bench.kit.publish import publish
from bench.kit.server import ServerProcess, ServerSpec
from loadtest.workload import Pair
from model_format.features import EncodedRequest, FeatureEncoder
from model_format.manifest import Manifest, read_manifest


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The flags both scenarios take: model and data, the raw engine's batch sizes and rounds, the step judgement,
    and where results go (`add_publish_args`)."""
    ap = new_parser(name, doc)
    add_model_args(ap)
    ap.add_argument("--batch-sizes", type=ints, default=[1, 8, 16, 32], help="raw engine batch sizes")
    ap.add_argument("--engine-rounds", type=int, default=2)
    ap.add_argument("--engine-min-s", type=float, default=1.5)
    ap.add_argument("--refine", type=int, default=2, help="bisection steps after each grid")
    ap.add_argument("--p99-bound-ms", type=float, default=1000.0)
    ap.add_argument("--server-cwd", type=Path, default=REPO_ROOT)
    ap.add_argument("--quick", action="store_true", help="smoke run (~2 minutes); numbers are rough")
    add_publish_args(ap)
    return ap


def parse(ap: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.engine_rounds, args.engine_min_s, args.refine = [8, 16], 1, 0.8, 0
    return args


@dataclass(frozen=True)
class ModelData:
    """The newest complete version of a model and the pairs it can encode, one per distinct model input (one cache
    key: two pairs can truncate to the same input)."""

    version_dir: Path
    manifest: Manifest
    encoder: FeatureEncoder
    pairs: list[Pair]
    items: list[EncodedRequest]
    source: str
    pairs_read: int


def load_model_data(model_repo: Path, model: str, data: Path) -> ModelData:
    version_dir = newest_version(model_repo, model)
    manifest, read = read_manifest(version_dir), load_pairs(data)
    encoder = FeatureEncoder(version_dir, manifest)
    inputs: dict[EncodedRequest, Pair] = {}
    for p, item in encodable(encoder, read.pairs):
        inputs.setdefault(item, p)
    return ModelData(version_dir, manifest, encoder, list(inputs.values()), list(inputs), read.described,
                     len(read.pairs))


def engine_limit(data: ModelData, threads: int, args: argparse.Namespace, log: Progress) -> dict[str, Any]:
    """The raw ONNX Runtime fp32 throughput at its best batch size (`engine.throughput_sweep`): the server's ceiling."""
    log(f"raw engine: fp32, batch sizes {args.batch_sizes}, {args.engine_rounds} round(s) of ≥ {args.engine_min_s} s")
    engine = load_engine(data.version_dir, data.manifest, "fp32", *arrangement(threads))
    table = throughput_sweep({"fp32": engine}, data.items, args.batch_sizes, arrival_order_precisions=(),
                             rounds=args.engine_rounds, min_seconds=args.engine_min_s, progress=log)
    del engine
    gc.collect()  # the session's arenas and threads go before any server starts
    best = table["best"]["fp32"]
    log(f"  limit {best['samples_per_s']:.1f}/s at batch {best['batch_size']}")
    return {"limit": best["samples_per_s"], "batch_size": best["batch_size"], "threads": threads,
            "arrangement": describe(threads), "rounds": args.engine_rounds, "min_seconds": args.engine_min_s,
            "by_batch": {bs: row["samples_per_s"] for bs, row in table["grouped"]["fp32"].items()}, "table": table}


def serving(args: argparse.Namespace, name: str, flags: Sequence[str], log_name: str, log: Progress, label: str,
            workers: int = 1) -> AbstractAsyncContextManager[ServerProcess]:
    """`python -m server` with `flags`, its log in <out>/<name>/<log_name>, stopped on leaving."""
    return server_kit.serving(ServerSpec(args.model_repo, args.server_cwd, flags, args.out / name / log_name,
                                         workers=workers), log, label)


def main(args: argparse.Namespace, name: str, measure: Callable[[argparse.Namespace, Progress], dict[str, Any]],
         markdown: Callable[[dict[str, Any]], str], plot: Callable[[dict[str, Any], Path], Path]) -> int:
    """`measure` (or --from-results), then results.json, <name>.png, section.md and the BENCHMARKS.md section.
    SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C; no server outlives the tool."""
    def on_sigterm(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    log, t0, out = logger(name), time.perf_counter(), args.out / name
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.from_results is not None:
            results = json.loads(args.from_results.read_text())
        else:
            results = {"machine": machine()}
            log(machine_line(results["machine"]))
            results.update(measure(args, log), elapsed_s=round(time.perf_counter() - t0, 1), args=vars(args))
        publish(args, name, results, markdown(results), [plot(results, out / f"{name}.png")], log)
    finally:
        server_kit.stop_all()
    log(f"done in {time.perf_counter() - t0:.0f} s; results in {out}/")
    return 0

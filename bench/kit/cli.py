"""What every benchmark's command line shares: the common flags, the server flags that decide throughput,
progress lines."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from bench.kit.data import DEFAULT_DATA, REPO_ROOT
from bench.kit.server import server_flags

Progress = Callable[[str], None]


def logger(tool: str) -> Progress:
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{tool} {time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    return log


def new_parser(name: str, doc: str | None, conflict_handler: str = "error") -> argparse.ArgumentParser:
    """`python -m bench.<name>`'s parser (name "": `python -m bench`), its module docstring as the help."""
    return argparse.ArgumentParser(prog="python -m bench" + (f".{name}" if name else ""), description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   conflict_handler=conflict_handler)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """What is measured and where the results go."""
    ap.add_argument("--model-repo", type=Path, default=Path("model_repo"), help="repository with the demo model")
    ap.add_argument("--model", default="demo", help="model to serve (its newest complete version)")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="output root; results in <out>/<tool>/")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="JSONL query/title pairs (synthetic pairs when absent) [default: %(default)s]")
    ap.add_argument("--timeout-s", type=float, default=5.0, help="gRPC deadline of every call")


def add_publish_args(ap: argparse.ArgumentParser, from_results: bool = True) -> None:
    """Where a tool publishes, and (`from_results`) re-rendering from a saved run."""
    ap.add_argument("--benchmarks-md", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    ap.add_argument("--docs-dir", type=Path, default=REPO_ROOT / "docs" / "bench")
    ap.add_argument("--no-docs", action="store_true", help="do not touch BENCHMARKS.md and docs/bench/")
    if from_results:
        ap.add_argument("--from-results", type=Path, default=None, metavar="RESULTS_JSON",
                        help="measure nothing: rewrite the section, plots and BENCHMARKS.md from a saved results.json")


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The flags of the benchmarks that load one server at its sustainable rate."""
    add_model_args(ap)
    ap.add_argument("--threads", type=int, default=0,
                    help="server --intra-op-threads, with --engine-lanes to fill the cores (0 = the server's default)")
    ap.add_argument("--server-args", default="", help="extra server flags, e.g. '--max-batch-size 8'")
    ap.add_argument("--rate", type=float, default=None,
                    help="the sustainable rate (req/s) to build the load on; default: cached or measured")
    ap.add_argument("--remeasure-rate", action="store_true", help="measure the sustainable rate even if cached")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--quick", action="store_true", help="short smoke run; numbers are rough")
    add_publish_args(ap, from_results=False)


def throughput_flags(args: argparse.Namespace) -> list[str]:
    """Server flags that decide throughput, as `make bench` runs the server, plus `--server-args`."""
    return server_flags(threads=args.threads, log_level=None, extra=args.server_args.split())

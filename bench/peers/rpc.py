"""What the peers share that is light to import (Ray's gRPC proxy imports this module): the Score handler, the
command line, waiting for SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from scoring.v1 import scoring_pb2

SERVICE = "scoring.v1.Scorer"


def scorer_handler(score: Callable[..., Any], decode: bool = True) -> grpc.GenericRpcHandler:
    """`scoring.v1.Scorer/Score` answered by `score(request, context)`: messages, or raw bytes unless `decode`."""
    handler = grpc.unary_unary_rpc_method_handler(
        score, request_deserializer=scoring_pb2.ScoreRequest.FromString if decode else None,
        response_serializer=scoring_pb2.ScoreResponse.SerializeToString if decode else None)
    return grpc.method_handlers_generic_handler(SERVICE, {"Score": handler})


def add_scorer_to_ray_proxy(servicer: Any, server: Any) -> None:
    """The servicer function Ray Serve's gRPC proxy is given. Not the generated `add_ScorerServicer_to_server`: it
    also calls `add_registered_method_handlers`, which Ray 2.58's proxy does not override, so the handlers of its
    placeholder servicer would answer (every call: "descriptor 'SerializeToString' ... to a 'Mock' object")."""
    server.add_generic_rpc_handlers((scorer_handler(servicer.Score),))


def peer_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m bench.peers.{module}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version-dir", type=Path, required=True, help="model version folder (manifest.json)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", "--grpc-port", type=int, required=True, help="the gRPC port")
    return ap


def until_signal() -> Callable[[], None]:
    """Catches SIGTERM and SIGINT from now on; the function returned blocks until one has come."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _sig, _frame: stop.set())

    def wait() -> None:
        while not stop.wait(1.0):  # a timed wait: signal handlers run between waits
            pass

    return wait

"""The afternoon version: a plain `grpc.server(ThreadPoolExecutor)`, one ORT run per request, no batching.

    python -m bench.peers.naive_server --version-dir model_repo/demo/1 --port 50061

Same tokenizer and vocabularies (`FeatureEncoder`), same session options as the raw engine (full graph
optimization, 2 intra-op threads). Concurrent calls run the one session from several pool threads at
once (ORT allows that); nothing queues or groups them. Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc

from bench.peers.model import PeerModel
from model_format.features import FeatureError
from scoring.v1 import scoring_pb2, scoring_pb2_grpc


class NaiveScorer(scoring_pb2_grpc.ScorerServicer):
    def __init__(self, model: PeerModel) -> None:
        self.model = model

    def Score(self, request: scoring_pb2.ScoreRequest, context: grpc.ServicerContext) -> scoring_pb2.ScoreResponse:
        if not request.query.strip():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "query is blank")
        try:
            item = self.model.encode(request)
        except FeatureError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return self.model.response(self.model.score([item])[0], request)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peers.naive_server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version-dir", type=Path, required=True, help="model version folder (manifest.json)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    # 10 handler threads: the usual example value. More only add contention on a small machine.
    ap.add_argument("--workers", type=int, default=10, help="gRPC handler threads")
    args = ap.parse_args(argv)

    model = PeerModel.load(args.version_dir, args.threads)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers))
    scoring_pb2_grpc.add_ScorerServicer_to_server(NaiveScorer(model), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"naive server on {args.host}:{args.port}", flush=True)
    while not stop.wait(1.0):  # a timed wait: signal handlers run between waits
        pass
    server.stop(grace=2).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
